"""Training step: mpirt's elastic step against a bare mpi4py SGD loop and torch DDP (gloo).

    python -m bench train [--ranks 4] [--steps 60] [--hidden 512] [--batch 512]

One MPI job (``mpirt launch``, the fault-tolerant tcp path) runs the same MLP on the same synthetic
data three ways, one after the other, each from the same initial parameters:

- bare: backward, ``torch.cat`` of the gradients, one mpi4py ``Allreduce``, divide, ``step``;
- mpirt: ``mpirt.elastic.DistributedOptimizer`` (buckets reduced while backward runs, the sample
  count with them, ``Agree``, unpack x 1/n, ``step``): the protocol ``mpirt train`` runs each step;
- DDP: ``DistributedDataParallel`` on gloo (bucketed allreduce overlapped with backward);
- compute alone (forward, backward, step; no communication) and communication alone (the reducer's
  allreduce and the Agree, no backward): the step's time against max(compute, communication).
Figures: samples/s over the timed steps (after warm-up), and mpirt against each.
"""

import argparse

from bench.common import free_port, mpirt_launch, run_worker, table, write_results

WORKER = r'''
import json, sys, time
import numpy as np
import torch
import torch.distributed as dist
import mpirt.elastic as elastic
from mpirt.kernels.torch_loss import cross_entropy
cfg = json.loads(sys.argv[1])
torch.set_num_threads(1)
group = elastic.init()
comm, MPI, rank, size = group.ec.comm, group.ec.MPI, group.rank, group.size
dist.init_process_group("gloo", init_method=cfg["gloo"], rank=rank, world_size=size)
B, H, D = cfg["batch"], cfg["hidden"], 784
rng = np.random.default_rng(0)
X = torch.from_numpy(rng.standard_normal((B * 8, D), dtype=np.float32))
Y = torch.from_numpy(rng.integers(0, 10, B * 8))
def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.ReLU(), torch.nn.Linear(H, H), torch.nn.ReLU(),
                               torch.nn.Linear(H, 10))
def batch(s):
    a = (s % 8) * B
    lo, hi = a + B * rank // size, a + B * (rank + 1) // size
    return X[lo:hi], Y[lo:hi]
def bare():
    m = model(); opt = torch.optim.SGD(m.parameters(), lr=0.01)
    params = list(m.parameters())
    def step(s):
        x, y = batch(s)
        opt.zero_grad()
        cross_entropy(m(x), y, reduction="sum").backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        comm.Allreduce(MPI.IN_PLACE, flat.numpy())
        flat /= B
        o = 0
        for p in params:
            p.grad.copy_(flat[o:o + p.numel()].view_as(p)); o += p.numel()
        opt.step()
    return step
def ours():
    m = model()
    opt = elastic.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.01), m.parameters(), group)
    def step(s):
        x, y = batch(s)
        opt.zero_grad()
        cross_entropy(m(x), y, reduction="sum").backward()
        opt.step(samples=len(y), step=None)
    return step
def compute():  # this rank's share of the step alone: forward, backward, step (no communication)
    m = model(); opt = torch.optim.SGD(m.parameters(), lr=0.01)
    def step(s):
        x, y = batch(s)
        opt.zero_grad()
        cross_entropy(m(x), y, reduction="sum").backward()
        opt.step()
    return step
def communication():  # the step's communication alone: the same reducer, gradients already there
    from mpirt.train.allreduce import GradAllreduce
    m = model()
    red = GradAllreduce(group.ec, list(m.parameters()), n_stats=4)
    def step(s):
        red.allreduce(np.zeros(4))
        group.ec.agree(True)
    return step
def ddp():
    m = torch.nn.parallel.DistributedDataParallel(model())
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    def step(s):
        x, y = batch(s)
        opt.zero_grad()
        (cross_entropy(m(x), y, reduction="sum") * (size / B)).backward()  # DDP averages over ranks
        opt.step()
    return step
out = {}
for name, make in (("bare", bare), ("mpirt", ours), ("ddp", ddp), ("compute", compute), ("comm", communication)) * cfg["rounds"]:
    step = make()
    for s in range(5):
        step(s)
    comm.Barrier()
    t = time.perf_counter()
    for s in range(cfg["steps"]):
        step(s)
    comm.Barrier()
    out.setdefault(name, []).append(cfg["steps"] * B / (time.perf_counter() - t))
if rank == 0:
    print("RESULT " + json.dumps(out), flush=True)
dist.destroy_process_group()
group.close()
'''


def main(argv):
    p = argparse.ArgumentParser(prog="python -m bench train")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3, help="each way is run this many times, interleaved")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=512)
    args = p.parse_args(argv)
    cfg = {"steps": args.steps, "rounds": args.rounds, "hidden": args.hidden, "batch": args.batch,
           "gloo": f"tcp://127.0.0.1:{free_port()}"}
    out = run_worker(mpirt_launch(args.ranks), WORKER, cfg, what="train")
    med = {k: sorted(v)[len(v) // 2] for k, v in out.items()}
    rows = [[k, f"{med[k]:,.0f}", f"{med['mpirt'] / med[k]:.2f}x"] for k in ("mpirt", "bare", "ddp")]
    print(f"## Training throughput, MLP 784-{args.hidden}-{args.hidden}-10, global batch {args.batch}, "
          f"{args.ranks} ranks (median of {args.rounds} rounds of {args.steps} steps)\n")
    print(table(rows, ["loop", "samples/s", "mpirt / this"]))
    print(f"\nelastic-step overhead against the bare mpi4py loop: {100 * (med['bare'] / med['mpirt'] - 1):+.1f}%")
    step, comp, com = (args.batch / med[k] for k in ("mpirt", "compute", "comm"))
    print(f"step {1e3 * step:.1f} ms; compute alone {1e3 * comp:.1f} ms, communication alone {1e3 * com:.1f} ms: "
          f"step / max(compute, communication) = {step / max(comp, com):.2f} (overlap: < (compute + comm) / max)")
    print(f"ceiling: no loop beats its compute alone, so none is more than DDP's step / compute alone = "
          f"{args.batch / med['ddp'] / comp:.2f}x DDP")
    print("wrote", write_results("train", {"config": cfg, "ranks": args.ranks, "samples_per_s": out}))
    return 0
