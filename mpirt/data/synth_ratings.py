"""MovieLens-like ratings made on the spot, as a CSV with MovieLens' header (``prepare ratings``' input).

    python -m mpirt.data.synth_ratings OUT.csv [--users 600] [--items 400] [--ratings 30000] [--seed 0]

Ratings come from a hidden low-rank model (rank 4, user and item biases, noise), rounded to half
stars in [0.5, 5], so matrix factorisation has something to find; users and items are drawn with a
long tail (a few are rated often, most rarely), and timestamps increase with a user's activity.
"""

import argparse

import numpy as np


def write_ratings(path, users=600, items=400, ratings=30000, seed=0):
    rng = np.random.default_rng(seed)
    U, V = rng.normal(0, 0.6, (users, 4)), rng.normal(0, 0.6, (items, 4))
    bu, bi = rng.normal(0, 0.4, users), rng.normal(0, 0.4, items)
    pu = rng.permutation(1.0 / np.arange(1, users + 1) ** 0.7)  # a long tail: popularity ~ 1 / rank^0.7
    pi = rng.permutation(1.0 / np.arange(1, items + 1) ** 0.9)
    u = rng.choice(users, ratings, p=pu / pu.sum())
    i = rng.choice(items, ratings, p=pi / pi.sum())
    r = np.clip(np.round(2 * (3.5 + (U[u] * V[i]).sum(1) + bu[u] + bi[i] + rng.normal(0, 0.3, ratings))) / 2, 0.5, 5)
    ts = 1_000_000_000 + np.sort(rng.integers(0, 10**8, ratings))
    order = np.lexsort((ts, u))  # sorted by user, as MovieLens ships its ratings.csv
    with open(path, "w") as f:
        f.write("userId,movieId,rating,timestamp\n")
        for k in order:
            f.write(f"{u[k] + 1},{i[k] + 1},{r[k]:.1f},{ts[k]}\n")
    return ratings


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mpirt.data.synth_ratings")
    p.add_argument("output", metavar="OUT.csv")
    p.add_argument("--users", type=int, default=600)
    p.add_argument("--items", type=int, default=400)
    p.add_argument("--ratings", type=int, default=30000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    n = write_ratings(a.output, a.users, a.items, a.ratings, a.seed)
    print(f"{a.output}: {n} ratings of {a.items} items by {a.users} users")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
