"""The cupy backend: the CUDA sources beside this file, compiled by NVRTC once per device."""

import os

import cupy as cp
import numpy as np

name = "cupy"
HERE = os.path.dirname(os.path.abspath(__file__))
WARPS_PER_BLOCK = 8  # predict.cu's shared table is sized for 8 warps
CHUNK = 32768  # pack.cu's CHUNK
_modules = {}
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}


def owns(x):
    return isinstance(x, cp.ndarray)


def _module(source):
    """RawModule for kernels/<source>, memoised per device (a module belongs to one context)."""
    key = (source, cp.cuda.Device().id)
    mod = _modules.get(key)
    if mod is None:
        with open(os.path.join(HERE, source)) as f:
            mod = cp.RawModule(code=f.read(), options=("--std=c++17", "-lineinfo"))
        _modules[key] = mod
    return mod


def _suffix(x):
    if x.dtype in _SUFFIX:
        return _SUFFIX[x.dtype]
    if x.dtype.name == "bfloat16":
        return "bf16"
    raise TypeError(f"unsupported dtype {x.dtype}")


def _rows(z):
    """A row-contiguous 2-D view (leading dimension ld) of the logits."""
    if z.strides[1] != z.itemsize:
        z = cp.ascontiguousarray(z)
    return z, z.strides[0] // z.itemsize


def softmax_xent(logits, labels, ignore_index, smoothing, grad_scale):
    z, ld = _rows(logits)
    n, C = z.shape
    y = cp.ascontiguousarray(labels, dtype=cp.int64)
    want = grad_scale is not None
    grad = cp.empty_like(z) if want else None
    if n == 0 or C == 0:
        return 0.0, 0, 0, (cp.zeros_like(z) if want else None)
    loss = cp.empty(n, dtype=cp.float32)
    correct = cp.empty(n, dtype=cp.int32)
    kernel = _module("xent.cu").get_function(f"xent_{_suffix(z)}")
    blocks = (n + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK
    kernel((blocks,), (32 * WARPS_PER_BLOCK,),
           (z, y, np.int64(n), np.int32(C), np.int64(ld), np.int64(ignore_index), np.float32(smoothing),
            np.float32(grad_scale or 0.0), np.int32(want), grad if want else z, np.int64(C), loss, correct))
    # One device-to-host copy for the three numbers (each sync costs more than the sums).
    stats = cp.stack([loss.sum(dtype=cp.float64), correct.sum(dtype=cp.float64),
                      (y != ignore_index).sum(dtype=cp.float64)]).get()
    return float(stats[0]), int(stats[1]), int(stats[2]), grad


def predict_topk(logits, k):
    if k > 32:
        raise ValueError("top-k supports k <= 32")
    z, ld = _rows(logits)
    n, C = z.shape
    idx = cp.empty((n, k), dtype=cp.int64)
    prob = cp.empty((n, k), dtype=cp.float32)
    if n:
        blocks = (n + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK
        _module("predict.cu").get_function(f"topk_{_suffix(z)}")(
            (blocks,), (32 * WARPS_PER_BLOCK,), (z, np.int64(n), np.int32(C), np.int64(ld), np.int32(k), idx, prob))
    return idx, prob


_CHUNK_DTYPE = np.dtype([("ptr", "<u8"), ("flat_offset", "<i8"), ("count", "<i4"), ("pad", "<i4")])
_tables = {}


def _chunk_table(tensors):
    """The device table of chunks for these tensors, cached by their addresses and sizes."""
    key = tuple((t.data.ptr, t.size) for t in tensors)
    table = _tables.get(key)
    if table is None:
        rows, offset = [], 0
        for t in tensors:
            if t.dtype != cp.float32 or not t.flags.c_contiguous:
                raise TypeError("pack/unpack on cupy take contiguous float32 arrays")
            for start in range(0, t.size, CHUNK):
                rows.append((t.data.ptr + 4 * start, offset + start, min(CHUNK, t.size - start), 0))
            offset += t.size
        table = (cp.asarray(np.array(rows, dtype=_CHUNK_DTYPE).view(np.uint8)), len(rows), offset)
        if len(_tables) > 64:
            _tables.clear()
        _tables[key] = table
    return table


def pack(tensors, out=None):
    table, count, total = _chunk_table(tensors)
    out = cp.empty(total, dtype=cp.float32) if out is None else out
    if count:
        _module("pack.cu").get_function("pack_f32")((count,), (256,), (table, out))
    return out


def unpack(flat, tensors, scale):
    table, count, _ = _chunk_table(tensors)
    if count:
        _module("pack.cu").get_function("unpack_f32")((count,), (256,), (table, flat, np.float32(scale)))


def _grid(n):
    return (min(max((n + 255) // 256, 1), 65535),), (256,)


def compress(x, dtype, residual=None):
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    out = cp.empty(x.shape, dtype=cp.float16 if dtype == "fp16" else cp.uint16)
    fn = _module("compress.cu").get_function("compress_f16" if dtype == "fp16" else "compress_bf16")
    grid, block = _grid(x.size)
    fn(grid, block, (x, residual if residual is not None else 0, out, np.int64(x.size)))
    return out


def decompress(c, dtype, out=None):
    out = cp.empty(c.shape, dtype=cp.float32) if out is None else out
    fn = _module("compress.cu").get_function("decompress_f16" if dtype == "fp16" else "decompress_bf16")
    grid, block = _grid(c.size)
    fn(grid, block, (c, out, np.int64(c.size)))
    return out


def segment_add(dst, src, offset):
    view = dst[offset:offset + src.size]
    grid, block = _grid(src.size)
    _module("compress.cu").get_function("segment_add_f32")(grid, block, (view, cp.ascontiguousarray(src),
                                                                         np.int64(src.size)))
