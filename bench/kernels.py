"""Kernel benchmarks: fused softmax-cross-entropy and bucket pack/unpack, each beside its baseline.

    python -m bench kernels [--quick] [--require-gpu]

CPU: the torch backend against the numpy reference (loss forward+backward, 65,536 x 1,000), and
pack/unpack of 160 tensors (25M floats, ResNet-50-like sizes) against per-tensor copies.
GPU (cupy + CUDA): the fused kernel against torch's F.cross_entropy forward+backward, fp32 and
bf16, and its bandwidth against a device-to-device copy measured in the same run; pack/unpack
against torch.cat + split and against one device copy of the same bytes.
"""

import argparse
import os
import statistics
import time

import numpy as np

from bench.common import table, timeit, write_results

N, C = 65536, 1000


def resnet_like_sizes(total=25_000_000, count=160, seed=0):
    """Tensor sizes like ResNet-50's gradients: a few large, many small, summing to ``total``."""
    rng = np.random.default_rng(seed)
    w = rng.lognormal(mean=0.0, sigma=2.2, size=count)
    sizes = np.maximum((w / w.sum() * total).astype(np.int64), 1)
    sizes[np.argmax(sizes)] += total - sizes.sum()
    return sizes.tolist()


def cpu_suite(repeat, n):
    import torch

    import mpirt.kernels as K

    rng = np.random.default_rng(0)
    z = rng.normal(size=(n, C)).astype(np.float32)
    y = rng.integers(0, C, size=n)
    zt, yt = torch.from_numpy(z), torch.from_numpy(y)
    t_np = timeit(lambda: K.softmax_xent(z, y, grad_scale=1.0 / n, backend="numpy"), repeat=repeat)
    t_th = timeit(lambda: K.softmax_xent(zt, yt, grad_scale=1.0 / n, backend="torch"), repeat=repeat)
    sizes = resnet_like_sizes()
    tensors = [torch.randn(s) for s in sizes]
    flat = torch.empty(sum(sizes))

    def per_tensor():
        o = 0
        for t in tensors:
            flat[o:o + t.numel()].copy_(t)
            o += t.numel()
        o = 0
        for t in tensors:
            t.copy_(flat[o:o + t.numel()])
            o += t.numel()

    def fused():
        K.pack(tensors, flat, backend="torch")
        K.unpack(flat, tensors, 1.0, backend="torch")

    t_loop = timeit(per_tensor, repeat=repeat)
    t_pack = timeit(fused, repeat=repeat)
    med = statistics.median
    rows = [
        [f"softmax-xent fwd+bwd {n}x{C} fp32", "torch backend", f"{1e3 * med(t_th):.1f}", "numpy reference",
         f"{1e3 * med(t_np):.1f}", f"{med(t_np) / med(t_th):.2f}x"],
        ["pack+unpack 160 tensors, 25M floats", "mpirt.kernels (torch)", f"{1e3 * med(t_pack):.1f}",
         "per-tensor copies", f"{1e3 * med(t_loop):.1f}", f"{med(t_loop) / med(t_pack):.2f}x"],
    ]
    return rows, {"xent_numpy_s": t_np, "xent_torch_s": t_th, "pack_fused_s": t_pack, "pack_loop_s": t_loop}


def _gpu_time(fn, repeat, cp):
    for _ in range(3):
        fn()
    cp.cuda.Device().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    samples = []
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    return samples


def gpu_suite(repeat):
    import cupy as cp
    import torch
    import torch.nn.functional as F

    import mpirt.kernels as K

    med = statistics.median
    big = cp.empty(1 << 28, dtype=cp.float32)  # 1 GiB
    dst = cp.empty_like(big)
    t_copy = _gpu_time(lambda: cp.copyto(dst, big), repeat, cp)
    copy_bw = 2 * big.nbytes / med(t_copy)
    rows, raw = [], {"memcpy_s": t_copy, "memcpy_GBps": copy_bw / 1e9}
    for dtype in ("float32", "bfloat16"):
        tz = torch.randn(N, C, device="cuda").to(getattr(torch, dtype))
        ty = torch.randint(0, C, (N,), device="cuda")
        z, y = cp.from_dlpack(tz), cp.from_dlpack(ty)
        t_ours = _gpu_time(lambda: K.softmax_xent(z, y, grad_scale=1.0 / N, backend="cupy"), repeat, cp)
        leaf = tz.detach().requires_grad_()

        def torch_ce():
            leaf.grad = None
            F.cross_entropy(leaf, ty, reduction="sum").backward()

        t_torch = _gpu_time(torch_ce, repeat, cp)
        moved = 2 * tz.numel() * tz.element_size() + ty.numel() * 8
        bw = moved / med(t_ours)
        rows.append([f"softmax-xent fwd+bwd {N}x{C} {dtype}", f"{1e3 * med(t_ours):.3f}", "F.cross_entropy fwd+bwd",
                     f"{1e3 * med(t_torch):.3f}", f"{med(t_torch) / med(t_ours):.2f}x",
                     f"{bw / 1e9:.0f} GB/s = {100 * bw / copy_bw:.0f}% of copy"])
        raw[f"xent_{dtype}"] = {"ours_s": t_ours, "torch_s": t_torch, "bytes": moved}
    sizes = resnet_like_sizes()
    tensors = [cp.random.standard_normal(s, dtype=cp.float32) for s in sizes]
    flat = cp.empty(sum(sizes), dtype=cp.float32)
    t_pack = _gpu_time(lambda: K.pack(tensors, flat, backend="cupy"), repeat, cp)
    t_unpack = _gpu_time(lambda: K.unpack(flat, tensors, 0.5, backend="cupy"), repeat, cp)
    tt = [torch.from_dlpack(t) for t in tensors]
    t_cat = _gpu_time(lambda: torch.cat(tt), repeat, cp)
    tflat = torch.from_dlpack(flat)
    t_split = _gpu_time(lambda: [t.copy_(s.view_as(t)) for t, s in zip(tt, torch.split(tflat, sizes))], repeat, cp)
    same = cp.empty_like(flat)
    t_same = _gpu_time(lambda: cp.copyto(same, flat), repeat, cp)
    for label, ours, base in (("pack", t_pack, t_cat), ("unpack (x scale)", t_unpack, t_split)):
        rows.append([f"{label} 160 tensors, 25M floats", f"{1e3 * med(ours):.3f}",
                     "torch.cat" if label == "pack" else "split + copy_", f"{1e3 * med(base):.3f}",
                     f"{med(base) / med(ours):.2f}x", f"{100 * med(t_same) / med(ours):.0f}% of copy of same bytes"])
    raw.update(pack_s=t_pack, unpack_s=t_unpack, cat_s=t_cat, split_s=t_split, copy_same_s=t_same)
    return rows, raw


def main(argv):
    p = argparse.ArgumentParser(prog="python -m bench kernels")
    p.add_argument("--quick", action="store_true", help="8,192 rows on the CPU instead of 65,536")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--require-gpu", action="store_true", default=os.environ.get("MPIRT_REQUIRE_GPU") == "1")
    args = p.parse_args(argv)
    t0 = time.time()
    rows, raw = cpu_suite(args.repeat, 8192 if args.quick else N)
    print("## Kernels on the CPU (ms, median)\n")
    print(table(rows, ["what", "mpirt", "ms", "baseline", "ms", "speed-up"]))
    results = {"cpu": raw}
    import mpirt.kernels as K

    if K.available("cupy"):
        grows, graw = gpu_suite(max(args.repeat, 20))
        print("\n## Kernels on the GPU (ms, median; bandwidth against a device copy in the same run)\n")
        print(table(grows, ["what", "mpirt ms", "baseline", "ms", "speed-up", "bandwidth"]))
        results["gpu"] = graw
    elif args.require_gpu:
        raise SystemExit("--require-gpu: cupy with a CUDA device is not available")
    else:
        print("\n(no GPU: cupy kernels not measured)")
    print(f"\nwrote {write_results('kernels', results)} in {time.time() - t0:.0f} s")
    return 0
