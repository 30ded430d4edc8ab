"""Kernel benchmarks: fused softmax-cross-entropy and bucket pack/unpack, each beside its baseline.

    python -m bench kernels [--quick] [--repeat N] [--require-gpu]

CPU: the torch backend against the numpy reference (loss forward+backward, 65,536 x 1,000 fp32),
and pack+unpack of 160 tensors (25M floats, ResNet-50-like sizes) against per-tensor copies.
GPU (cupy + CUDA): the fused kernel against torch's F.cross_entropy forward+backward, fp32 and
bf16, and its bandwidth against a device-to-device copy measured in the same run; pack/unpack
against torch.cat + split and against one device copy of the same bytes.

Two GPU figures per kernel: "call" is the API as a training step calls it, one call at a time
between CUDA events (allocations, launch and, for the loss, the copy of the totals to the host
included); "kernel" is back-to-back launches on preallocated buffers, time / launches: what the
GPU itself takes, and what the bandwidth is computed from.
"""

import argparse
import os
import statistics
import time

import numpy as np

from bench.common import table, timeit, write_results

N, C = 65536, 1000
med = statistics.median


def resnet_like_sizes(total=25_000_000, count=160, seed=0):
    """Tensor sizes like ResNet-50's gradients: a few large, many small, summing to ``total``."""
    rng = np.random.default_rng(seed)
    w = rng.lognormal(mean=0.0, sigma=2.2, size=count)
    sizes = np.maximum((w / w.sum() * total).astype(np.int64), 1)
    sizes[np.argmax(sizes)] += total - sizes.sum()
    return sizes.tolist()


def _ms(samples):
    return f"{1e3 * med(samples):.3f}"


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
    bucket = K.Bucket(tensors)

    def copy_loop():
        o = 0
        for t in tensors:
            flat[o:o + t.numel()].copy_(t.view(-1))
            o += t.numel()
        o = 0
        for t in tensors:
            t.copy_(flat[o:o + t.numel()].view_as(t))
            o += t.numel()

    def cat_split():
        torch.cat([t.view(-1) for t in tensors], out=flat)
        for t, part in zip(tensors, torch.split(flat, sizes)):
            t.copy_(part.view_as(t))

    def ours():
        bucket.pack(flat)
        bucket.unpack(flat)

    arrays = [t.numpy() for t in tensors]
    flat_np = flat.numpy()
    np_bucket = K.Bucket(arrays)

    def np_loop():
        np.concatenate([a.reshape(-1) for a in arrays], out=flat_np)
        o = 0
        for a in arrays:
            a[...] = flat_np[o:o + a.size].reshape(a.shape)
            o += a.size

    def np_ours():
        np_bucket.pack(flat_np)
        np_bucket.unpack(flat_np)

    t_ours, t_loop, t_cat = (timeit(f, repeat=repeat) for f in (ours, copy_loop, cat_split))
    t_np_ours, t_np_loop = (timeit(f, repeat=repeat) for f in (np_ours, np_loop))
    xent = f"softmax-xent fwd+bwd {n}x{C} fp32"
    pk = "pack+unpack 160 tensors, 25M floats"
    rows = [
        [xent, "torch backend", _ms(t_th), "numpy reference (float64)", _ms(t_np), f"{med(t_np) / med(t_th):.2f}x"],
        [pk, "Bucket (torch)", _ms(t_ours), "per-tensor copy_ loop", _ms(t_loop), f"{med(t_loop) / med(t_ours):.2f}x"],
        [pk, "Bucket (torch)", _ms(t_ours), "torch.cat + split/copy_", _ms(t_cat), f"{med(t_cat) / med(t_ours):.2f}x"],
        [pk, "Bucket (numpy)", _ms(t_np_ours), "np.concatenate + slice-assign loop", _ms(t_np_loop),
         f"{med(t_np_loop) / med(t_np_ours):.2f}x"],
    ]
    raw = {"xent_numpy_s": t_np, "xent_torch_s": t_th, "pack_bucket_torch_s": t_ours, "pack_copy_loop_s": t_loop,
           "pack_cat_split_s": t_cat, "pack_bucket_numpy_s": t_np_ours, "pack_numpy_loop_s": t_np_loop}
    return rows, raw


def _call_time(fn, repeat, cp):
    """Per-call GPU time: events around one call at a time (host work before the launch counts)."""
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


def _stream_time(fn, repeat, cp, inner=20):
    """Back-to-back time per launch: ``inner`` launches between two events keep the GPU busy."""
    for _ in range(3):
        fn()
    cp.cuda.Device().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    samples = []
    for _ in range(repeat):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(cp.cuda.get_elapsed_time(start, end) / 1e3 / inner)
    return samples


def _memcpy_time(dst, src, repeat, cp):
    """The better of cudaMemcpy device-to-device and cupy's copy kernel, per copy."""
    t_dma = _stream_time(lambda: dst.data.copy_from_device_async(src.data, src.nbytes), repeat, cp)
    t_kernel = _stream_time(lambda: cp.copyto(dst, src), repeat, cp)
    return min(t_dma, t_kernel, key=med)


def gpu_suite(repeat):
    import cupy as cp
    import torch
    import torch.nn.functional as F

    import mpirt.kernels as K

    cpk = K.backend("cupy")
    big = cp.empty(1 << 28, dtype=cp.float32)  # 1 GiB
    dst = cp.empty_like(big)
    t_copy = _memcpy_time(dst, big, repeat, cp)
    copy_bw = 2 * big.nbytes / med(t_copy)
    del big, dst
    rows = [["device copy, 1 GiB (read + write)", _ms(t_copy), "-", "-", "-", f"{copy_bw / 1e9:.0f} GB/s"]]
    raw = {"memcpy_s": t_copy, "memcpy_GBps": copy_bw / 1e9}
    for dtype in ("float32", "bfloat16"):
        tz = torch.randn(N, C, device="cuda").to(getattr(torch, dtype))
        ty = torch.randint(0, C, (N,), device="cuda")
        z, y = cp.from_dlpack(tz), cp.from_dlpack(ty)
        t_call = _call_time(lambda: K.softmax_xent(z, y, grad_scale=1.0 / N, backend="cupy"), repeat, cp)
        kernel, blocks = cpk.xent_plan(z, C)
        grad, stats = cp.empty_like(z), cp.zeros(8 + 4 * blocks, dtype=cp.float64)
        t_kernel = _stream_time(lambda: cpk.xent_launch(kernel, blocks, z, C, y, -100, 0.0, 1.0 / N, grad, stats),
                                repeat, cp)
        leaf = tz.detach().requires_grad_()

        def torch_ce():
            leaf.grad = None
            F.cross_entropy(leaf, ty, reduction="sum").backward()

        t_torch = _call_time(torch_ce, repeat, cp)
        moved = 2 * tz.numel() * tz.element_size() + ty.numel() * ty.element_size()
        bw = moved / med(t_kernel)
        what = f"softmax-xent fwd+bwd {N}x{C} {dtype}"
        rows.append([f"{what}: call", _ms(t_call), "F.cross_entropy fwd+bwd", _ms(t_torch),
                     f"{med(t_torch) / med(t_call):.2f}x", f"{moved / med(t_call) / 1e9:.0f} GB/s"])
        rows.append([f"{what}: kernel ({kernel})", _ms(t_kernel), "F.cross_entropy fwd+bwd", _ms(t_torch),
                     f"{med(t_torch) / med(t_kernel):.2f}x", f"{bw / 1e9:.0f} GB/s = {100 * bw / copy_bw:.0f}% of copy"])
        raw[f"xent_{dtype}"] = {"call_s": t_call, "kernel_s": t_kernel, "torch_s": t_torch, "bytes": moved,
                                "kernel": kernel}
        del tz, z, grad, leaf
    sizes = resnet_like_sizes()
    tensors = [cp.random.standard_normal(s, dtype=cp.float32) for s in sizes]
    flat = cp.empty(sum(sizes), dtype=cp.float32)
    bucket = K.Bucket(tensors)
    t_pack = _call_time(lambda: bucket.pack(flat), repeat, cp)
    t_pack_k = _stream_time(lambda: bucket.pack(flat), repeat, cp)
    t_pack_fn = _call_time(lambda: K.pack(tensors, flat), repeat, cp)
    t_unpack = _call_time(lambda: bucket.unpack(flat, 0.5), repeat, cp)
    t_unpack_k = _stream_time(lambda: bucket.unpack(flat, 0.5), repeat, cp)
    tt = [torch.from_dlpack(t) for t in tensors]
    tflat = torch.from_dlpack(flat)
    t_cat = _call_time(lambda: torch.cat(tt, out=tflat), repeat, cp)
    t_split = _call_time(lambda: [t.copy_(s) for t, s in zip(tt, torch.split(tflat, sizes))], repeat, cp)
    same = cp.empty_like(flat)
    t_same = _memcpy_time(same, flat, repeat, cp)
    moved = 2 * flat.nbytes
    for label, call, kern, base_name, base in (
            ("pack (Bucket)", t_pack, t_pack_k, "torch.cat", t_cat),
            ("unpack x scale (Bucket)", t_unpack, t_unpack_k, "split + copy_", t_split)):
        rows.append([f"{label} 160 tensors, 25M floats: call", _ms(call), base_name, _ms(base),
                     f"{med(base) / med(call):.2f}x", f"{100 * med(t_same) / med(call):.0f}% of copy of same bytes"])
        rows.append([f"{label}: kernel", _ms(kern), base_name, _ms(base), f"{med(base) / med(kern):.2f}x",
                     f"{moved / med(kern) / 1e9:.0f} GB/s = {100 * med(t_same) / med(kern):.0f}% of copy"])
    rows.append(["pack (K.pack, cached plan): call", _ms(t_pack_fn), "torch.cat", _ms(t_cat),
                 f"{med(t_cat) / med(t_pack_fn):.2f}x", f"{100 * med(t_same) / med(t_pack_fn):.0f}% of copy"])
    rows.append(["device copy of the same 100 MB", _ms(t_same), "-", "-", "-",
                 f"{moved / med(t_same) / 1e9:.0f} GB/s"])
    raw.update(pack_call_s=t_pack, pack_kernel_s=t_pack_k, pack_fn_call_s=t_pack_fn, unpack_call_s=t_unpack,
               unpack_kernel_s=t_unpack_k, cat_s=t_cat, split_s=t_split, copy_same_s=t_same)
    return rows, raw


def main(argv):
    p = argparse.ArgumentParser(prog="python -m bench kernels")
    p.add_argument("--quick", action="store_true", help="8,192 rows on the CPU instead of 65,536")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--require-gpu", action="store_true", default=os.environ.get("MPIRT_REQUIRE_GPU") == "1",
                   help="fail unless cupy and a CUDA device are present (also MPIRT_REQUIRE_GPU=1)")
    args = p.parse_args(argv)
    t0 = time.time()
    import mpirt.kernels as K

    gpu = K.available("cupy")
    if args.require_gpu and not gpu:
        raise SystemExit("--require-gpu: cupy with a CUDA device is not available")
    rows, raw = cpu_suite(args.repeat, 8192 if args.quick else N)
    print("## Kernels on the CPU (ms, median)\n")
    print(table(rows, ["what", "mpirt", "ms", "baseline", "ms", "speed-up"]))
    results = {"cpu": raw}
    if gpu:
        grows, graw = gpu_suite(max(args.repeat, 20))
        print("\n## Kernels on the GPU (ms, median; bandwidth against a device copy in the same run)\n")
        print(table(grows, ["what", "mpirt ms", "baseline", "ms", "speed-up", "bandwidth"]))
        results["gpu"] = graw
    else:
        print("\n(no GPU: cupy kernels not measured)")
    print(f"\nwrote {write_results('kernels', results)} in {time.time() - t0:.0f} s")
    return 0
