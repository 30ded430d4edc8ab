"""The cupy backend: the CUDA sources beside this file, compiled by NVRTC once per device."""

import os

import cupy as cp
import numpy as np

name = "cupy"
HERE = os.path.dirname(os.path.abspath(__file__))
WARPS = 8  # xent.cu's and predict.cu's rows per block (one warp each)
REG_CLASSES = 1024  # xent.cu: rows up to this many classes are held in registers
CHUNK = 8192  # pack.cu's CHUNK
THREADS = 256
_NULL = np.uint64(0)  # a null pointer argument
_modules = {}
_functions = {}
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}


def owns(x):
    return isinstance(x, cp.ndarray)


def _fn(source, kernel):
    """Kernel ``kernel`` of kernels/<source>, compiled and looked up once per device.

    A module belongs to one device's context, hence the device id in the key.
    """
    dev = cp.cuda.Device().id
    fn = _functions.get((source, kernel, dev))
    if fn is None:
        mod = _modules.get((source, dev))
        if mod is None:
            with open(os.path.join(HERE, source)) as f:
                mod = cp.RawModule(code=f.read(), options=("--std=c++17", "-lineinfo"))
            _modules[(source, dev)] = mod
        fn = _functions[(source, kernel, dev)] = mod.get_function(kernel)
    return fn


def _suffix(x):
    if x.dtype in _SUFFIX:
        return _SUFFIX[x.dtype]
    if x.dtype.name == "bfloat16":
        return "bf16"
    raise TypeError(f"unsupported logits dtype {x.dtype} (float32, float16 or bfloat16)")


def _rows(z):
    """A 2-D view with unit column stride and its leading dimension (elements between rows)."""
    if z.strides[1] != z.itemsize or z.strides[0] % z.itemsize:
        z = cp.ascontiguousarray(z)
    return z, z.strides[0] // z.itemsize


def xent_plan(z, ld):
    """(kernel name, blocks) for logits ``z`` with leading dimension ``ld``.

    The register kernel needs rows of at most REG_CLASSES classes in whole, 16-byte aligned vectors.
    """
    n, C = z.shape
    vec = 16 // z.itemsize
    regs = C <= REG_CLASSES and C % vec == 0 and (ld * z.itemsize) % 16 == 0 and z.data.ptr % 16 == 0
    return f"xent_{'regs' if regs else 'stream'}_{_suffix(z)}", (n + WARPS - 1) // WARPS


def xent_launch(kernel, blocks, z, ld, y, ignore_index, smoothing, grad_scale, grad, stats):
    """Launch the fused kernel: no allocation, no sync (the benchmark times this alone).

    ``stats`` is a float64 buffer of ``8 + 4 * blocks`` whose element 4 (the kernel's ticket
    counter) is 0; the kernel leaves it 0, so the buffer can be reused.
    """
    n, C = z.shape
    _fn("xent.cu", kernel)((blocks,), (32 * WARPS,),
                           (z, y, np.int64(n), np.int32(C), np.int64(ld), np.int64(ignore_index),
                            np.float32(smoothing), np.float32(0.0 if grad is None else grad_scale),
                            _NULL if grad is None else grad, np.int64(C), stats))


def softmax_xent(logits, labels, ignore_index, smoothing, grad_scale):
    z, ld = _rows(logits)
    n, C = z.shape
    y = labels
    if y.dtype != cp.int64 or not y.flags.c_contiguous:
        y = cp.ascontiguousarray(y, dtype=cp.int64)
    grad = cp.empty((n, C), dtype=z.dtype) if grad_scale is not None else None
    if n == 0 or C == 0:
        if n and bool((y != ignore_index).any()):
            raise ValueError("labels outside [0, classes) that are not ignore_index")
        return 0.0, 0, 0, grad
    kernel, blocks = xent_plan(z, ld)
    stats = cp.zeros(8 + 4 * blocks, dtype=cp.float64)
    xent_launch(kernel, blocks, z, ld, y, ignore_index, smoothing, grad_scale, grad, stats)
    loss, correct, kept, bad = stats[:4].get()  # the one device-to-host copy (and sync) per call
    if bad:
        raise ValueError(f"{int(bad)} labels outside [0, {C}) that are not ignore_index ({ignore_index})")
    return float(loss), int(correct), int(kept), grad


def predict_topk(logits, k):
    if k > 32:
        raise ValueError("top-k on cupy supports k <= 32")
    z, ld = _rows(logits)
    n, C = z.shape
    idx = cp.empty((n, k), dtype=cp.int64)
    prob = cp.empty((n, k), dtype=cp.float32)
    if n:
        blocks = (n + WARPS - 1) // WARPS
        _fn("predict.cu", f"topk_{_suffix(z)}")(
            (blocks,), (32 * WARPS,), (z, np.int64(n), np.int32(C), np.int64(ld), np.int32(k), idx, prob))
    return idx, prob


# One row per CHUNK floats of a tensor: pack.cu's struct Chunk {u64 ptr; i64 flat_offset; i32 count; i32 pad}.
_CHUNK_DTYPE = np.dtype([("ptr", "<u8"), ("flat_offset", "<i8"), ("count", "<i4"), ("pad", "<i4")])


def _plan(tensors):
    """(total floats, device chunk table, chunks) for these tensors, in their order."""
    for t in tensors:
        if not isinstance(t, cp.ndarray) or t.dtype != cp.float32 or not t.flags.c_contiguous:
            raise TypeError("pack/unpack on cupy take C-contiguous float32 cupy arrays")
    count = len(tensors)
    sizes = np.fromiter((t.size for t in tensors), np.int64, count)
    ptrs = np.fromiter((t.data.ptr for t in tensors), np.uint64, count)
    offsets = np.cumsum(sizes) - sizes
    per = (sizes + CHUNK - 1) // CHUNK
    owner = np.repeat(np.arange(count), per)
    start = (np.arange(int(per.sum())) - np.repeat(np.cumsum(per) - per, per)) * CHUNK
    rows = np.zeros(len(owner), _CHUNK_DTYPE)
    rows["ptr"] = ptrs[owner] + 4 * start.astype(np.uint64)
    rows["flat_offset"] = offsets[owner] + start
    rows["count"] = np.minimum(CHUNK, sizes[owner] - start)
    return int(sizes.sum()), cp.asarray(rows.view(np.uint8)), len(rows)


def _flat(buf, numel):
    if not isinstance(buf, cp.ndarray) or buf.dtype != cp.float32 or not buf.flags.c_contiguous:
        raise TypeError("the flat buffer must be a C-contiguous float32 cupy array")
    if buf.size < numel:
        raise ValueError(f"the flat buffer holds {buf.size} floats, the tensors {numel}")
    return buf


class Bucket:
    """The chunk table of a fixed list of tensors, uploaded once; each pack/unpack is one launch."""

    def __init__(self, tensors):
        self.tensors = list(tensors)  # keeps the memory the table points at alive
        self.numel, self._table, self._chunks = _plan(self.tensors)

    def pack(self, out=None):
        out = cp.empty(self.numel, dtype=cp.float32) if out is None else _flat(out, self.numel)
        if self._chunks:
            _fn("pack.cu", "pack_f32")((self._chunks,), (THREADS,), (self._table, out))
        return out

    def unpack(self, flat, scale=1.0):
        flat = _flat(flat, self.numel)
        if self._chunks:
            _fn("pack.cu", "unpack_f32")((self._chunks,), (THREADS,), (self._table, flat, np.float32(scale)))


_plans = {}


def _cached_plan(tensors):
    """A plan keyed by the tensors' addresses and sizes: the table depends on nothing else, so a
    plan stays right even when memory is freed and reused by tensors of the same sizes."""
    key = tuple((t.data.ptr, t.size) for t in tensors)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= 64:
            _plans.clear()
        plan = _plans[key] = _plan(tensors)
    return plan


def pack(tensors, out=None):
    numel, table, chunks = _cached_plan(tensors)
    out = cp.empty(numel, dtype=cp.float32) if out is None else _flat(out, numel)
    if chunks:
        _fn("pack.cu", "pack_f32")((chunks,), (THREADS,), (table, out))
    return out


def unpack(flat, tensors, scale):
    numel, table, chunks = _cached_plan(tensors)
    flat = _flat(flat, numel)
    if chunks:
        _fn("pack.cu", "unpack_f32")((chunks,), (THREADS,), (table, flat, np.float32(scale)))


def _grid(n):
    """Blocks for a grid-stride loop over n elements (at most 65,535; the loop covers the rest)."""
    return (int(min(max((n + THREADS - 1) // THREADS, 1), 65535)),), (THREADS,)


def _f32_buffer(x, what, size):
    if not isinstance(x, cp.ndarray) or x.dtype != cp.float32 or not x.flags.c_contiguous or x.size != size:
        raise TypeError(f"{what} must be a C-contiguous float32 cupy array of {size} elements")
    return x


def compress(x, dtype, residual=None):
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    if residual is not None:
        _f32_buffer(residual, "residual", x.size)
    out = cp.empty(x.shape, dtype=cp.float16 if dtype == "fp16" else cp.uint16)
    if x.size:
        grid, block = _grid(x.size)
        _fn("compress.cu", "compress_f16" if dtype == "fp16" else "compress_bf16")(
            grid, block, (x, residual if residual is not None else _NULL, out, np.int64(x.size)))
    return out


def decompress(c, dtype, out=None):
    c = cp.ascontiguousarray(c)
    out = cp.empty(c.shape, dtype=cp.float32) if out is None else _f32_buffer(out, "out", c.size)
    if c.size:
        grid, block = _grid(c.size)
        _fn("compress.cu", "decompress_f16" if dtype == "fp16" else "decompress_bf16")(
            grid, block, (c, out, np.int64(c.size)))
    return out


def segment_add(dst, src, offset):
    if not isinstance(dst, cp.ndarray) or dst.dtype != cp.float32 or not dst.flags.c_contiguous:
        raise TypeError("segment_add on cupy needs a C-contiguous float32 destination")
    src = cp.ascontiguousarray(src, dtype=cp.float32).ravel()
    if src.size:
        grid, block = _grid(src.size)
        _fn("reduce.cu", "segment_add_f32")(grid, block, (dst.ravel()[offset:offset + src.size], src,
                                                          np.int64(src.size)))
