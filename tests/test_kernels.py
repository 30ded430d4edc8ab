"""One test body per kernel, run on every backend this machine has, against the numpy reference.

On a GPU run (MPIRT_REQUIRE_GPU=1) a missing cupy or CUDA is a failure, not a skip.
"""

import glob
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mpirt.kernels as K

REQUIRE_GPU = os.environ.get("MPIRT_REQUIRE_GPU", "") not in ("", "0")
KERNEL_DIR = os.path.dirname(K.__file__)


def _gpu_backend(name):
    ok = K.available("cupy") if name == "cupy" else torch.cuda.is_available()
    if not ok:
        if REQUIRE_GPU:
            pytest.fail(f"MPIRT_REQUIRE_GPU=1 but backend {name} has no GPU here")
        pytest.skip(f"{name}: no GPU on this machine")


@pytest.fixture(params=["numpy", "torch", pytest.param("torch-cuda", marks=pytest.mark.gpu),
                        pytest.param("cupy", marks=pytest.mark.gpu)])
def be(request):
    """(backend name, to_device(numpy array), to_numpy(array))."""
    name = request.param
    if name in ("cupy", "torch-cuda"):
        _gpu_backend(name)
    if name == "numpy":
        return "numpy", lambda a: a, lambda a: np.asarray(a)
    if name == "torch":
        return "torch", torch.as_tensor, lambda t: t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
    if name == "torch-cuda":
        return "torch", lambda a: torch.as_tensor(a).cuda(), lambda t: t.float().cpu().numpy()
    import cupy as cp

    return "cupy", cp.asarray, lambda a: cp.asnumpy(a)


def _ref(z, y, **kw):
    return K.softmax_xent(np.asarray(z, np.float64), y, backend="numpy", grad_scale=kw.pop("grad_scale", 1.0), **kw)


@pytest.mark.parametrize("n, C", [(1, 1), (5, 7), (33, 1023), (64, 1025), (3, 1000)])
def test_xent_matches_reference(be, n, C):
    name, dev, host = be
    rng = np.random.default_rng(n * C)
    z = rng.normal(scale=3, size=(n, C)).astype(np.float32)
    y = rng.integers(0, C, size=n)
    y[::4] = -100
    got = K.softmax_xent(dev(z), dev(y), grad_scale=0.5, backend=name)
    ref = _ref(z, y, grad_scale=0.5)
    assert got.count == ref.count and got.correct == ref.correct
    assert got.loss_sum == pytest.approx(ref.loss_sum, rel=1e-5, abs=1e-5)
    np.testing.assert_allclose(host(got.grad), ref.grad, rtol=1e-4, atol=1e-6)
    assert not host(got.grad)[y == -100].any(), "ignored rows have zero gradient"


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_xent_label_smoothing_matches_torch(be, smoothing):
    name, dev, host = be
    rng = np.random.default_rng(1)
    z = rng.normal(size=(40, 17)).astype(np.float32)
    y = rng.integers(0, 17, size=40)
    y[3] = -100
    t = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    loss = F.cross_entropy(t, torch.tensor(y), reduction="sum", ignore_index=-100, label_smoothing=smoothing)
    loss.backward()
    got = K.softmax_xent(dev(z), dev(y), label_smoothing=smoothing, grad_scale=1.0, backend=name)
    assert got.loss_sum == pytest.approx(float(loss), rel=1e-5)
    np.testing.assert_allclose(host(got.grad), t.grad.numpy(), atol=1e-6)


def test_xent_extreme_logits(be):
    name, dev, host = be
    z = np.array([[1e4, 0.0, -1e4, 5.0], [-np.inf, 2.0, 1.0, -np.inf], [3.0, -np.inf, 3.0, 0.0]], np.float32)
    y = np.array([0, 1, 3])
    got = K.softmax_xent(dev(z), dev(y), grad_scale=1.0, backend=name)
    ref = _ref(z, y)
    assert np.isfinite(got.loss_sum) and got.loss_sum == pytest.approx(ref.loss_sum, rel=1e-5)
    g = host(got.grad)
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, ref.grad, atol=1e-6)
    assert got.correct == 2  # row 2 ties between classes 0 and 2: the first wins, and the label is 3


def test_xent_target_at_minus_inf_is_infinite_loss(be):
    name, dev, host = be
    z = np.array([[0.0, -np.inf]], np.float32)
    got = K.softmax_xent(dev(z), dev(np.array([1])), grad_scale=1.0, backend=name)
    assert got.loss_sum == np.inf
    np.testing.assert_allclose(host(got.grad), [[1.0, -1.0]])


def test_xent_empty_and_all_ignored(be):
    name, dev, host = be
    empty = K.softmax_xent(dev(np.zeros((0, 5), np.float32)), dev(np.zeros(0, np.int64)), grad_scale=1.0,
                           backend=name)
    assert (empty.loss_sum, empty.correct, empty.count) == (0.0, 0, 0) and host(empty.grad).shape == (0, 5)
    z = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    ign = K.softmax_xent(dev(z), dev(np.full(6, -100)), grad_scale=1.0, backend=name)
    assert (ign.loss_sum, ign.correct, ign.count) == (0.0, 0, 0) and not host(ign.grad).any()


def test_xent_non_contiguous_input(be):
    name, dev, host = be
    base = np.random.default_rng(2).normal(size=(30, 20)).astype(np.float32)
    y = np.arange(10) % 7
    z = dev(base)[::3, ::2] if name != "numpy" else base[::3, ::2]
    zt = dev(np.ascontiguousarray(base.T))
    for view in (z, zt.T[::3, ::2]):
        got = K.softmax_xent(view, dev(y), grad_scale=1.0, backend=name)
        ref = _ref(base[::3, ::2], y)
        assert got.loss_sum == pytest.approx(ref.loss_sum, rel=1e-5)
        np.testing.assert_allclose(host(got.grad), ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_xent_half_precision_inputs(be, dtype):
    name, dev, host = be
    if name == "numpy" and dtype == "bfloat16":
        pytest.skip("numpy has no bfloat16: the reference runs on the upcast values")
    z32 = np.random.default_rng(3).normal(size=(50, 300)).astype(np.float32)
    y = np.random.default_rng(4).integers(0, 300, size=50)
    tz = torch.tensor(z32).to(getattr(torch, dtype))
    z_rounded = tz.float().numpy()
    if name == "numpy":
        z = z32.astype(np.float16)
    elif name == "cupy":
        import cupy as cp

        z = cp.from_dlpack(tz.cuda())
    else:
        z = tz if dev(np.zeros(1)).device.type == "cpu" else tz.cuda()
    got = K.softmax_xent(z, dev(y), grad_scale=1.0, backend=name)
    ref = _ref(z_rounded, y)
    assert got.loss_sum == pytest.approx(ref.loss_sum, rel=2e-3)
    np.testing.assert_allclose(host(got.grad).astype(np.float32), ref.grad, atol=1e-2)


@pytest.mark.parametrize("k", [1, 3, 32])
def test_predict_topk(be, k):
    name, dev, host = be
    z = np.random.default_rng(k).normal(size=(37, 101)).astype(np.float32)
    idx, prob = K.predict_topk(dev(z), k, backend=name)
    ridx, rprob = K.predict_topk(z, k, backend="numpy")
    np.testing.assert_array_equal(host(idx), ridx)
    np.testing.assert_allclose(host(prob), rprob, rtol=1e-5, atol=1e-7)
    assert (np.diff(host(prob), axis=1) <= 0).all()


def test_pack_unpack_round_trip(be):
    name, dev, host = be
    rng = np.random.default_rng(5)
    sizes = [1, 7, 1023, 1025, 8192, 8193, 3, 70000]
    arrays = [rng.normal(size=s).astype(np.float32) for s in sizes]
    tensors = [dev(a.copy()) for a in arrays]
    flat = K.pack(tensors, backend=name)
    np.testing.assert_array_equal(host(flat), np.concatenate(arrays))
    for t in tensors:
        t[...] = 0
    K.unpack(flat, tensors, scale=0.25, backend=name)
    for t, a in zip(tensors, arrays):
        np.testing.assert_allclose(host(t), a * 0.25, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_compress_with_error_feedback(be, dtype):
    name, dev, host = be
    x = np.random.default_rng(6).normal(size=1001).astype(np.float32) * 1e-3 + 1.0
    residual = dev(np.zeros_like(x))
    c = K.compress(dev(x), dtype, residual=residual, backend=name)
    back = host(K.decompress(c, dtype, backend=name))
    np.testing.assert_allclose(back + host(residual), x, rtol=1e-6)  # nothing is lost, only deferred
    tol = 1e-2 if dtype == "bf16" else 1e-3
    np.testing.assert_allclose(back, x, rtol=tol)
    ref = K.decompress(K.compress(x, dtype, backend="numpy"), dtype, backend="numpy")
    np.testing.assert_array_equal(back, ref)  # round to nearest even, bit for bit


def test_segment_add(be):
    name, dev, host = be
    dst = np.arange(1030, dtype=np.float32)
    src = np.ones(1001, dtype=np.float32)
    d = dev(dst.copy())
    K.segment_add(d, dev(src), 13, backend=name)
    expect = dst.copy()
    expect[13:1014] += 1
    np.testing.assert_array_equal(host(d), expect)


def test_autograd_function_matches_torch():
    from mpirt.kernels.torch_loss import cross_entropy

    z = torch.randn(20, 9, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 9, (20,))
    y[2] = -100
    torch.autograd.gradcheck(lambda t: cross_entropy(t, y, reduction="sum", label_smoothing=0.1), (z,))
    a = cross_entropy(z, y)
    a.backward()
    ga = z.grad.clone()
    z.grad = None
    b = F.cross_entropy(z, y)
    b.backward()
    assert float(a) == pytest.approx(float(b))
    torch.testing.assert_close(ga, z.grad)


def test_auto_follows_the_array_type():
    z = np.zeros((2, 3), np.float32)
    assert K.resolve(z)[0].name == "numpy"
    assert K.resolve(torch.zeros(2, 3))[0].name == "torch"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        K.softmax_xent(z, np.zeros(2, np.int64), backend="fortran")


def test_import_does_not_import_torch_or_cupy():
    code = "import mpirt.kernels, sys; assert 'torch' not in sys.modules and 'cupy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_every_cuda_source_compiles_for_hopper(tmp_path):
    nvcc = shutil.which("nvcc")
    if not nvcc:
        if os.environ.get("MPIRT_REQUIRE_NVCC", "") not in ("", "0"):
            pytest.fail("MPIRT_REQUIRE_NVCC=1 but nvcc is not on PATH")
        pytest.skip("nvcc not found")
    sources = sorted(glob.glob(os.path.join(KERNEL_DIR, "*.cu")))
    assert len(sources) >= 4
    procs = [subprocess.Popen([nvcc, "-arch=sm_90", "-cubin", "-o", str(tmp_path / (os.path.basename(s) + ".cubin")), s],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for s in sources]
    for s, p in zip(sources, procs):
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"{os.path.basename(s)} does not compile:\n{out}"
