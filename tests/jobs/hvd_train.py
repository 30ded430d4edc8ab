"""A Horovod-style training script (what users already have), run with mpirt.horovod.

Plain: the global batch of each step is the same rows on any number of ranks, each rank averages
its equal slice, and ``DistributedOptimizer`` averages over the ranks: N ranks train the model of
one rank (up to float sums). ``--elastic``: ``hvd.elastic.run`` with a ``TorchState``, an
``ElasticSampler`` and a commit every ``--commit-every`` steps, through ``MPIRT_FAULTS``; at the end
every rank checks that all hold the same model and that the sampler covered every epoch.

    mpirt launch -n 3 -- python tests/jobs/hvd_train.py --steps 40 --save out.npz
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F

import mpirt.horovod.torch as hvd

BATCH = 48  # divisible by 1, 2, 3 and 4 ranks


def data(n=960, d=12, classes=4):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, d, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, d, generator=g), y


def model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def plain(args, X, y):
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt = hvd.DistributedOptimizer(opt, named_parameters=net.named_parameters())
    hvd.broadcast_parameters(net.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    per = BATCH // hvd.size()
    for step in range(args.steps):
        start = (step * BATCH) % len(y) + hvd.rank() * per
        opt.zero_grad()
        F.cross_entropy(net(X[start:start + per]), y[start:start + per]).backward()
        opt.step()
    return net


def elastic(args, X, y):
    dataset = torch.utils.data.TensorDataset(X, y)
    net = model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.05), named_parameters=net.named_parameters())
    sampler = hvd.elastic.ElasticSampler(dataset, shuffle=True, seed=3)
    state = hvd.elastic.TorchState(net, opt, sampler=sampler, epoch=0, batch=0, seen=[])
    resets = []  # not in the state: sync() after a reset sets the state to rank 0's last commit
    state.register_reset_callbacks([lambda: resets.append(hvd.size())])

    @hvd.elastic.run
    def train(state):
        per = 8
        while state.epoch < args.epochs:
            loader = torch.utils.data.DataLoader(dataset, batch_size=per, sampler=state.sampler)
            for i, (xb, yb) in enumerate(loader):
                opt.zero_grad()
                F.cross_entropy(net(xb), yb).backward()
                opt.step()
                state.sampler.record_batch(i, per)
                state.batch += 1
                if state.batch % args.commit_every == 0:
                    state.commit()
            state.seen.append(state.sampler.processed_num)
            state.epoch += 1
            state.sampler.set_epoch(state.epoch)
            state.commit()

    train(state)
    # Every rank holds the same model, and every epoch was covered to its end.
    params = hvd.allgather_object([p.detach().numpy() for p in net.parameters()])
    assert all(np.array_equal(a, b) for p in params for a, b in zip(p, params[0])), "replicas differ"
    assert len(state.seen) == args.epochs and all(n >= len(dataset) for n in state.seen), state.seen
    if hvd.rank() == 0:
        print(f"hvd_train: {args.epochs} epochs, {hvd.size()} ranks at the end, resets at sizes {resets}", flush=True)
    return net


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--elastic", action="store_true")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--commit-every", type=int, default=4)
    p.add_argument("--save")
    args = p.parse_args()
    torch.set_num_threads(1)
    hvd.init()
    X, y = data()
    net = elastic(args, X, y) if args.elastic else plain(args, X, y)
    if args.save and hvd.rank() == 0:
        np.savez(args.save, **{k: v.detach().numpy() for k, v in net.state_dict().items()})
    hvd.shutdown()


if __name__ == "__main__":
    main()
