"""Horovod's synthetic benchmark step through ``mpirt.horovod`` against mpirt's own loop and DDP.

    python -m bench horovod [--ranks 2] [--steps 10] [--batch 8] [--image 112] [--rounds 3]

One MPI job (``mpirt launch``) times, on the same ranks and the same fixed synthetic batch as
Horovod's ``pytorch_synthetic_benchmark.py`` (ResNet-18 from examples/horovod/resnet.py, SGD,
``F.cross_entropy``), interleaved over ``--rounds``:

- hvd: ``hvd.DistributedOptimizer`` (mpirt.horovod.torch), as the example script runs it;
- mpirt: ``mpirt.elastic.DistributedOptimizer``, the step protocol and reducer of ``mpirt train``;
- DDP: ``DistributedDataParallel`` on gloo (``broadcast_buffers=False``: Horovod does not sync
  BatchNorm buffers either);
- compute alone (forward, backward, step) and communication alone (the reducer's allreduce and
  Agree): overlap shows as a step shorter than compute + communication.
Figures: milliseconds per step (median of the rounds), each against the others.
"""

import argparse
import os

from bench.common import free_port, mpirt_launch, run_worker, table, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r'''
import json, sys, time
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["examples"])
import resnet
import mpirt.horovod.torch as hvd
import mpirt.elastic as elastic
from mpirt.horovod.common import _rt
hvd.init()
group = _rt.group
rank, size = hvd.rank(), hvd.size()
torch.set_num_threads(cfg["threads"])
dist.init_process_group("gloo", init_method=cfg["gloo"], rank=rank, world_size=size)
B, S = cfg["batch"], cfg["image"]
torch.manual_seed(0)
data = torch.randn(B, 3, S, S)
target = torch.LongTensor(B).random_() % 1000
def model():
    torch.manual_seed(0)
    return resnet.resnet18()
def hvd_way():
    m = model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.01), named_parameters=m.named_parameters())
    def step():
        opt.zero_grad()
        F.cross_entropy(m(data), target).backward()
        opt.step()
    return step
def mpirt_way():
    m = model()
    opt = elastic.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.01), m.parameters(), group)
    def step():
        opt.zero_grad()
        F.cross_entropy(m(data), target, reduction="sum").backward()
        opt.step(samples=B)
    return step
def ddp_way():
    m = torch.nn.parallel.DistributedDataParallel(model(), broadcast_buffers=False)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    def step():
        opt.zero_grad()
        F.cross_entropy(m(data), target).backward()
        opt.step()
    return step
def compute():
    m = model(); opt = torch.optim.SGD(m.parameters(), lr=0.01)
    def step():
        opt.zero_grad()
        F.cross_entropy(m(data), target).backward()
        opt.step()
    return step
def communication():
    from mpirt.train.allreduce import GradAllreduce
    m = model()
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    red = GradAllreduce(group.ec, list(m.parameters()), n_stats=5)
    def step():
        red.allreduce(np.ones(5))
        group.ec.agree(True)
    return step
out = {}
comm = group.ec.comm
ways = (("hvd", hvd_way), ("mpirt", mpirt_way), ("ddp", ddp_way), ("compute", compute), ("comm", communication))
for name, make in ways * cfg["rounds"]:
    step = make()
    for _ in range(2):
        step()
    comm.Barrier()
    t = time.perf_counter()
    for _ in range(cfg["steps"]):
        step()
    comm.Barrier()
    out.setdefault(name, []).append((time.perf_counter() - t) / cfg["steps"])
if rank == 0:
    print("RESULT " + json.dumps(out), flush=True)
dist.destroy_process_group()
hvd.shutdown()
'''


def tables(r):
    """Markdown lines of a result (also used by ``python -m bench report``)."""
    cfg, lines = r["config"], []
    for mode, out in r["seconds_per_step"].items():
        med = {k: 1e3 * sorted(v)[len(v) // 2] for k, v in out.items()}
        rows = [[k, f"{med[k]:.1f}", f"{med[k] / med['hvd']:.2f}x", f"{med[k] / med['ddp']:.2f}x"]
                for k in ("hvd", "mpirt", "ddp")]
        comp, com = med["compute"], med["comm"]
        lines += [f"**{mode}**", "", table(rows, ["loop", "ms / step", "vs hvd", "vs DDP (gloo)"]), "",
                  f"compute alone {comp:.1f} ms, communication alone {com:.1f} ms (sum {comp + com:.1f}): step / "
                  f"(compute + communication) = hvd {med['hvd'] / (comp + com):.2f}, mpirt "
                  f"{med['mpirt'] / (comp + com):.2f}, DDP {med['ddp'] / (comp + com):.2f} (below 1: overlap).", ""]
    return [f"ResNet-18, {cfg['batch']} images of {cfg['image']}x{cfg['image']} per rank, {r['ranks']} ranks, "
            f"{cfg['threads']} torch thread(s) each; median of {cfg['rounds']} interleaved rounds of {cfg['steps']} "
            f"steps.", ""] + lines


# MPI's waits busy-poll by default; yielding lets the overlap thread's waits give the core back to
# backward when ranks fill the cores (mpirt launch sets it only when they outnumber them).
MODES = {"MPI waits busy-poll": "0", "MPI waits yield (mpi_yield_when_idle 1)": "1"}


def main(argv):
    p = argparse.ArgumentParser(prog="python -m bench horovod")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="each way is run this many times, interleaved")
    p.add_argument("--batch", type=int, default=8, help="images per rank (Horovod's --batch-size)")
    p.add_argument("--image", type=int, default=32, help="image side (Horovod's is 224)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    args = p.parse_args(argv)
    cfg = {"steps": args.steps, "rounds": args.rounds, "batch": args.batch, "image": args.image,
           "threads": args.threads, "examples": os.path.join(ROOT, "examples", "horovod")}
    results = {}
    for mode, flag in MODES.items():
        cfg["gloo"] = f"tcp://127.0.0.1:{free_port()}"
        results[mode] = run_worker(mpirt_launch(args.ranks), WORKER, cfg, what="horovod", timeout=3000,
                                   env={"OMPI_MCA_mpi_yield_when_idle": flag})
    doc = {"config": cfg, "ranks": args.ranks, "seconds_per_step": results}
    print("## Horovod's synthetic benchmark step through mpirt.horovod, mpirt.elastic and DDP\n")
    print("\n".join(tables(doc)))
    print("wrote", write_results("horovod", doc))
    return 0
