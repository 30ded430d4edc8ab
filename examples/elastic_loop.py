"""Your own PyTorch loop, made elastic with mpirt's Python API.

    mpirt launch -n 4 --spare 1 -- python examples/elastic_loop.py --steps 200
    MPIRT_FAULTS="kill:member=2:step=50;join:count=1:step=100" \\
        mpirt launch -n 4 --spare 1 -- python examples/elastic_loop.py --steps 200

Data: a fixed synthetic 10-class problem, generated from the seed (nothing is downloaded). The
global batch of step s is the same rows whatever the number of ranks; each rank takes a slice.
Kill ranks, add ranks: the final model is the one a single rank would train (up to float sums);
with --exact, bit for bit (fixed micro-batches of --micro-batch rows, summed in fixed point).
"""

import argparse

import numpy as np
import torch

import mpirt.elastic as elastic
from mpirt.kernels.torch_loss import cross_entropy


def make_data(seed, n=8192, d=32, classes=10):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 2, (classes, d)).astype(np.float32)
    y = rng.integers(0, classes, n)
    X = centers[y] + rng.normal(0, 1, (n, d)).astype(np.float32)
    return torch.from_numpy(X), torch.from_numpy(y)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exact", action="store_true", help="the same bits on any number of ranks")
    p.add_argument("--micro-batch", type=int, default=16, help="--exact: rows a micro-batch")
    p.add_argument("--save", help="write the final parameters here (.npz) from the coordinator")
    args = p.parse_args()

    group = elastic.init()
    X, y = make_data(args.seed)
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = elastic.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                       model.parameters(), group, exact=args.exact)
    state = elastic.TorchState(model, opt, step=0)

    @elastic.run(group)
    def train(state):
        while state.step < args.steps:
            start = (state.step * args.batch) % len(y)
            if args.exact:
                for j, a, b in opt.micro_batches(start, start + args.batch, args.micro_batch):
                    opt.zero_grad()
                    loss = cross_entropy(model(X[a:b]), y[a:b], reduction="sum")
                    loss.backward()
                    opt.accumulate(j, samples=b - a, loss=float(loss.detach()))
                opt.step(step=state.step)
                state.step += 1
                elastic.check_joins(opt)
                continue
            lo = start + args.batch * group.rank // group.size
            hi = start + args.batch * (group.rank + 1) // group.size
            opt.zero_grad()
            loss = cross_entropy(model(X[lo:hi]), y[lo:hi], reduction="sum")
            loss.backward()
            opt.step(samples=hi - lo, loss=float(loss.detach()), step=state.step)
            state.step += 1
            elastic.check_joins(opt)

    train(state)
    if group.is_coordinator:
        acc = float((model(X).argmax(1) == y).float().mean())
        print(f"elastic_loop: {state.step} steps on {group.size} rank(s), view {group.view.id}, "
              f"train accuracy {100 * acc:.1f}%", flush=True)
        if args.save:
            np.savez(args.save, **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    group.close()


if __name__ == "__main__":
    main()
