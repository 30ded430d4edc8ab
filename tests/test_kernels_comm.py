"""Allreduce helpers on every backend: bucket pack/unpack, bf16/fp16 compression, segment add."""

import numpy as np
import pytest

import mpirt.kernels as K
from test_kernels import be  # noqa: F401 - the backend fixture

# Odd sizes around the 4-float vectors and pack.cu's 8,192-float chunks.
SIZES = [1, 7, 1023, 1025, 8192, 8193, 3, 70000, 2, 16385]


def _arrays(seed, sizes):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in sizes]


def test_pack_unpack_round_trip(be):
    arrays = _arrays(5, SIZES)
    tensors = [be.dev(a) for a in arrays]
    flat = K.pack(tensors, backend=be.kernel_backend)
    np.testing.assert_array_equal(be.host(flat), np.concatenate(arrays))
    for t in tensors:
        t[...] = 0
    K.unpack(flat, tensors, scale=0.25, backend=be.kernel_backend)
    for t, a in zip(tensors, arrays):
        np.testing.assert_array_equal(be.host(t), a * np.float32(0.25))


def test_bucket_many_tensors_reused(be):
    """160 tensors of odd sizes (most land misaligned in the flat buffer), packed twice by one plan."""
    rng = np.random.default_rng(11)
    sizes = rng.integers(1, 3000, size=160).tolist()
    sizes[10], sizes[99] = 20001, 9000  # a few spanning several chunks
    arrays = _arrays(12, sizes)
    tensors = [be.dev(a) for a in arrays]
    bucket = K.Bucket(tensors, backend=be.kernel_backend)
    assert bucket.numel == sum(sizes)
    out = be.dev(np.full(bucket.numel + 5, -7, np.float32))  # a larger buffer: the tail is left alone
    assert bucket.pack(out) is out
    host = be.host(out)
    np.testing.assert_array_equal(host[:bucket.numel], np.concatenate(arrays))
    assert (host[bucket.numel:] == -7).all()
    for t in tensors:
        t[...] = 1
    bucket.unpack(out, scale=2.0)
    for t, a in zip(tensors, arrays):
        np.testing.assert_array_equal(be.host(t), a * 2)
    tensors[3][...] = 5  # the same plan sees the tensors' new contents
    np.testing.assert_array_equal(be.host(bucket.pack())[sum(sizes[:3]):sum(sizes[:4])], 5)


def test_unpack_into_misaligned_views(be):
    """Tensors that start 4 bytes past a 16-byte boundary: the kernels align their own writes."""
    base = be.dev(np.zeros(3000, np.float32))
    views = [base[1:1002], base[1003:2000]]
    flat = be.dev(np.arange(1998, dtype=np.float32))
    K.unpack(flat, views, scale=3.0, backend=be.kernel_backend)
    expect = np.zeros(3000, np.float32)
    expect[1:1002] = np.arange(1001) * 3
    expect[1003:2000] = np.arange(1001, 1998) * 3
    np.testing.assert_array_equal(be.host(base), expect)
    np.testing.assert_array_equal(be.host(K.pack(views, backend=be.kernel_backend)), np.arange(1998) * 3)


def test_bucket_rejects_a_short_buffer(be):
    bucket = K.Bucket([be.dev(np.zeros(10, np.float32))], backend=be.kernel_backend)
    with pytest.raises((ValueError, TypeError)):
        bucket.pack(be.dev(np.zeros(9, np.float32)))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_compress_with_error_feedback(be, dtype):
    x = np.random.default_rng(6).normal(size=1001).astype(np.float32) * 1e-3 + 1.0
    residual = be.dev(np.zeros_like(x))
    c = K.compress(be.dev(x), dtype, residual=residual, backend=be.kernel_backend)
    back = be.host(K.decompress(c, dtype, backend=be.kernel_backend))
    np.testing.assert_allclose(back + be.host(residual), x, rtol=1e-6)  # nothing is lost, only deferred
    np.testing.assert_allclose(back, x, rtol=1e-2 if dtype == "bf16" else 1e-3)
    ref = K.decompress(K.compress(x, dtype, backend="numpy"), dtype, backend="numpy")
    np.testing.assert_array_equal(back, ref)  # round to nearest even, bit for bit
    # The next round adds the residual back: two rounds together carry the sum of two inputs.
    c2 = K.compress(be.dev(x), dtype, residual=residual, backend=be.kernel_backend)
    two = back + be.host(K.decompress(c2, dtype, backend=be.kernel_backend)) + be.host(residual)
    np.testing.assert_allclose(two, 2 * x, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_compress_without_residual_and_into_out(be, dtype):
    x = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, 1e-8, 3.14159, np.inf, -np.inf] * 7, np.float32)
    c = K.compress(be.dev(x), dtype, backend=be.kernel_backend)
    out = be.dev(np.full(x.size, np.nan, np.float32))
    K.decompress(c, dtype, out=out, backend=be.kernel_backend)
    ref = K.decompress(K.compress(x, dtype, backend="numpy"), dtype, backend="numpy")
    np.testing.assert_array_equal(be.host(out), ref)


@pytest.mark.parametrize("offset, n", [(13, 1001), (0, 1030), (1, 3), (4, 1000), (2, 0)])
def test_segment_add(be, offset, n):
    dst = np.arange(1030, dtype=np.float32)
    src = np.random.default_rng(offset).normal(size=n).astype(np.float32)
    d = be.dev(dst)
    K.segment_add(d, be.dev(src), offset, backend=be.kernel_backend)
    expect = dst.copy()
    expect[offset:offset + n] += src
    np.testing.assert_array_equal(be.host(d), expect)


def test_segment_add_out_of_bounds(be):
    with pytest.raises(ValueError, match="does not fit"):
        K.segment_add(be.dev(np.zeros(10, np.float32)), be.dev(np.ones(4, np.float32)), 7, backend=be.kernel_backend)
