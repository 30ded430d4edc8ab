"""Softmax-cross-entropy and top-k: one test body per kernel, run on every backend this machine has,
against the float64 numpy reference (and torch's F.cross_entropy where it defines the answer).

Backends: numpy, torch (CPU), torch-cuda and cupy (GPU, marked ``gpu``). Without a GPU the GPU ones
skip, unless MPIRT_REQUIRE_GPU=1: then a missing cupy or CUDA is a failure.
The pack/compress/segment tests are in test_kernels_comm.py, the autograd loss, dispatch and the
nvcc check in test_kernels_api.py; both use the ``be`` fixture from here.
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mpirt.kernels as K

REQUIRE_GPU = os.environ.get("MPIRT_REQUIRE_GPU", "") not in ("", "0")


class Backend:
    """A backend under test: its name, and moving numpy data to it and back."""

    def __init__(self, name, kernel_backend, device=None):
        self.name, self.kernel_backend, self.device = name, kernel_backend, device

    def dev(self, a):
        a = np.asarray(a)
        if self.kernel_backend == "numpy":
            return a.copy()
        if self.kernel_backend == "torch":
            return torch.tensor(a, device=self.device)
        import cupy as cp

        return cp.asarray(a)

    def host(self, x):
        if isinstance(x, np.ndarray):
            return x
        if isinstance(x, torch.Tensor):
            return x.detach().float().cpu().numpy() if x.dtype == torch.bfloat16 else x.detach().cpu().numpy()
        import cupy as cp

        return cp.asnumpy(x)

    def half(self, z32, dtype):
        """``z32`` rounded to "float16"/"bfloat16" on this backend, and those values in float32."""
        t = torch.tensor(z32).to(getattr(torch, dtype))
        exact = t.float().numpy()
        if self.kernel_backend == "numpy":
            # numpy has no bfloat16: a bf16 tensor goes in, the backend computes on the upcast values.
            return (z32.astype(np.float16) if dtype == "float16" else t), exact
        if self.kernel_backend == "torch":
            return t.to(self.device), exact
        import cupy as cp

        if dtype == "float16":
            return cp.asarray(z32.astype(np.float16)), exact
        if not torch.cuda.is_available():
            pytest.skip("bfloat16 cupy arrays come from CUDA torch tensors (DLPack); torch has no CUDA here")
        return cp.from_dlpack(t.cuda()), exact


def _require(name, ok):
    if not ok:
        if REQUIRE_GPU:
            pytest.fail(f"MPIRT_REQUIRE_GPU=1 but backend {name} is not usable here")
        pytest.skip(f"{name}: no GPU on this machine")


@pytest.fixture(params=["numpy", "torch", pytest.param("torch-cuda", marks=pytest.mark.gpu),
                        pytest.param("cupy", marks=pytest.mark.gpu)])
def be(request):
    name = request.param
    if name == "torch-cuda":
        _require(name, torch.cuda.is_available())
        return Backend(name, "torch", "cuda")
    if name == "cupy":
        _require(name, K.available("cupy"))
    return Backend(name, name, "cpu" if name == "torch" else None)


def _ref(z, y, grad_scale=1.0, **kw):
    return K.softmax_xent(np.asarray(z, np.float64), np.asarray(y), backend="numpy", grad_scale=grad_scale, **kw)


def _check(be, got, ref, rtol=1e-5, grad_atol=1e-6):
    assert (got.count, got.correct) == (ref.count, ref.correct)
    assert got.loss_sum == pytest.approx(ref.loss_sum, rel=rtol, abs=1e-5)
    if ref.grad is not None:
        np.testing.assert_allclose(be.host(got.grad).astype(np.float64), ref.grad, rtol=1e-4, atol=grad_atol)


# 1023/1025/7 classes: the streaming path (and 4-byte loads); 1000/1024/8: rows held in registers
# on cupy; 2048: streaming with 16-byte loads; 33 and 64 rows span several blocks of 8 rows.
@pytest.mark.parametrize("n, C", [(1, 1), (5, 7), (9, 8), (33, 1023), (64, 1025), (3, 1000), (17, 1024), (10, 2048)])
def test_xent_matches_reference(be, n, C):
    rng = np.random.default_rng(n * C)
    z = rng.normal(scale=3, size=(n, C)).astype(np.float32)
    y = rng.integers(0, C, size=n)
    y[::4] = -100
    got = K.softmax_xent(be.dev(z), be.dev(y), grad_scale=0.5, backend=be.kernel_backend)
    ref = _ref(z, y, grad_scale=0.5)
    _check(be, got, ref)
    assert not be.host(got.grad)[y == -100].any(), "ignored rows have zero gradient"
    fwd = K.softmax_xent(be.dev(z), be.dev(y), backend=be.kernel_backend)
    assert fwd.grad is None and fwd.loss_sum == pytest.approx(ref.loss_sum, rel=1e-5, abs=1e-5)
    assert (fwd.correct, fwd.count) == (ref.correct, ref.count)


def test_xent_is_deterministic(be):
    z = np.random.default_rng(7).normal(size=(200, 96)).astype(np.float32)
    y = np.arange(200) % 96
    a = K.softmax_xent(be.dev(z), be.dev(y), grad_scale=1.0, backend=be.kernel_backend)
    b = K.softmax_xent(be.dev(z), be.dev(y), grad_scale=1.0, backend=be.kernel_backend)
    assert a.loss_sum == b.loss_sum  # bit for bit: the block partials are added in a fixed order
    np.testing.assert_array_equal(be.host(a.grad), be.host(b.grad))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("C", [16, 17])
def test_xent_matches_torch_cross_entropy(be, smoothing, C):
    rng = np.random.default_rng(C)
    z = rng.normal(size=(40, C)).astype(np.float32)
    y = rng.integers(0, C, size=40)
    y[3] = y[20] = -100
    t = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    loss = F.cross_entropy(t, torch.tensor(y), reduction="sum", ignore_index=-100, label_smoothing=smoothing)
    loss.backward()
    got = K.softmax_xent(be.dev(z), be.dev(y), label_smoothing=smoothing, grad_scale=1.0, backend=be.kernel_backend)
    assert got.loss_sum == pytest.approx(loss.item(), rel=1e-5)
    assert got.count == 38
    np.testing.assert_allclose(be.host(got.grad), t.grad.numpy(), atol=1e-6)


@pytest.mark.parametrize("pad", [0, 1])  # 4 classes: registers on cupy; 5: the streaming path
def test_xent_extreme_logits(be, pad):
    z = np.array([[1e4, 0.0, -1e4, 5.0], [-np.inf, 2.0, 1.0, -np.inf], [3.0, -np.inf, 3.0, 0.0],
                  [-1e4, -1e4 + 1, -1e4, -1e4]], np.float32)
    z = np.concatenate([z, np.full((4, pad), -np.inf, np.float32)], axis=1)
    y = np.array([0, 1, 3, 1])
    got = K.softmax_xent(be.dev(z), be.dev(y), grad_scale=1.0, backend=be.kernel_backend)
    ref = _ref(z, y)
    assert np.isfinite(got.loss_sum)
    _check(be, got, ref)
    assert np.isfinite(be.host(got.grad)).all()
    assert got.correct == 3  # row 2 ties between classes 0 and 2: the first wins, and the label is 3


@pytest.mark.parametrize("C", [2, 4])
def test_xent_target_at_minus_inf_is_infinite_loss(be, C):
    """Defined behaviour: a target logit of -inf gives loss +inf; the gradient stays finite."""
    z = np.full((1, C), -np.inf, np.float32)
    z[0, 0] = 0.0
    got = K.softmax_xent(be.dev(z), be.dev(np.array([1])), grad_scale=1.0, backend=be.kernel_backend)
    assert got.loss_sum == np.inf and got.count == 1 and got.correct == 0
    expect = np.zeros((1, C))
    expect[0, :2] = [1.0, -1.0]
    np.testing.assert_allclose(be.host(got.grad), expect)


def test_xent_empty_batch_and_all_ignored(be):
    empty = K.softmax_xent(be.dev(np.zeros((0, 5), np.float32)), be.dev(np.zeros(0, np.int64)), grad_scale=1.0,
                           backend=be.kernel_backend)
    assert (empty.loss_sum, empty.correct, empty.count) == (0.0, 0, 0)
    assert be.host(empty.grad).shape == (0, 5)
    z = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    ign = K.softmax_xent(be.dev(z), be.dev(np.full(6, -1)), ignore_index=-1, grad_scale=1.0,
                         backend=be.kernel_backend)
    assert (ign.loss_sum, ign.correct, ign.count) == (0.0, 0, 0) and not be.host(ign.grad).any()


@pytest.mark.parametrize("bad", [-1, 5, 1000])
def test_xent_rejects_labels_out_of_range(be, bad):
    z = np.zeros((3, 5), np.float32)
    with pytest.raises(ValueError, match="outside"):
        K.softmax_xent(be.dev(z), be.dev(np.array([0, bad, -100])), grad_scale=1.0, backend=be.kernel_backend)


def test_xent_non_contiguous_inputs(be):
    base = np.random.default_rng(2).normal(size=(30, 20)).astype(np.float32)
    y = np.arange(10) % 7
    strided = be.dev(base)[::3, ::2]  # column stride 2: copied; row stride 6
    row_strided = be.dev(base)[::3, :8]  # unit column stride, row stride 20: read in place
    transposed = be.dev(np.ascontiguousarray(base.T)).T[::3, ::2]
    for view, ref_z in ((strided, base[::3, ::2]), (row_strided, base[::3, :8]), (transposed, base[::3, ::2])):
        got = K.softmax_xent(view, be.dev(y), grad_scale=1.0, backend=be.kernel_backend)
        _check(be, got, _ref(ref_z, y))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("C", [1000, 300])  # 1000: 16-byte vectors in registers; 300: streaming
def test_xent_half_precision_inputs(be, dtype, C):
    rng = np.random.default_rng(C)
    z32 = rng.normal(size=(50, C)).astype(np.float32)
    y = rng.integers(0, C, size=50)
    y[7] = -100
    z, exact = be.half(z32, dtype)
    got = K.softmax_xent(z, be.dev(y), label_smoothing=0.05, grad_scale=1.0, backend=be.kernel_backend)
    ref = _ref(exact, y, label_smoothing=0.05)
    assert (got.count, got.correct) == (ref.count, ref.correct)
    assert got.loss_sum == pytest.approx(ref.loss_sum, rel=1e-4)
    g = be.host(got.grad).astype(np.float64)
    assert g.shape == (50, C)
    np.testing.assert_allclose(g, ref.grad, rtol=1e-2, atol=1e-3 if dtype == "float16" else 4e-3)


@pytest.mark.parametrize("k", [1, 3, 32])
def test_predict_topk(be, k):
    z = np.random.default_rng(k).normal(size=(37, 101)).astype(np.float32)
    idx, prob = K.predict_topk(be.dev(z), k, backend=be.kernel_backend)
    ridx, rprob = K.predict_topk(z, k, backend="numpy")
    np.testing.assert_array_equal(be.host(idx), ridx)
    np.testing.assert_allclose(be.host(prob), rprob, rtol=1e-5, atol=1e-7)
    assert (np.diff(be.host(prob), axis=1) <= 0).all()


def test_predict_topk_extremes(be):
    z = np.array([[1e4, -np.inf, 0.0, 1e4 - 1], [-np.inf, -np.inf, 2.0, -np.inf]], np.float32)
    idx, prob = K.predict_topk(be.dev(z), 2, backend=be.kernel_backend)
    idx = be.host(idx)
    assert idx[0].tolist() == [0, 3] and idx[1, 0] == 2 and idx[1, 1] in (0, 1, 3)  # torch orders ties freely
    np.testing.assert_allclose(be.host(prob), [[1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1))], [1, 0]],
                               rtol=1e-5)
