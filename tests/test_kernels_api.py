"""The autograd loss against F.cross_entropy, backend dispatch, lazy imports, and nvcc on every .cu."""

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
from mpirt.kernels.torch_loss import cross_entropy
from test_kernels import REQUIRE_GPU

KERNEL_DIR = os.path.dirname(K.__file__)


def test_autograd_loss_passes_gradcheck():
    z = torch.randn(12, 9, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 9, (12,))
    y[2] = -100
    for smoothing in (0.0, 0.1):
        for reduction in ("sum", "mean"):
            assert torch.autograd.gradcheck(
                lambda t: cross_entropy(t, y, reduction=reduction, label_smoothing=smoothing, backend="torch"), (z,))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_autograd_loss_matches_torch(reduction, smoothing):
    torch.manual_seed(0)
    z = torch.randn(33, 17, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 17, (33,))
    y[::5] = -100
    ours = cross_entropy(z, y, reduction=reduction, label_smoothing=smoothing)
    (g_ours,) = torch.autograd.grad(ours * 3.0, z)  # an upstream gradient other than 1
    ref = F.cross_entropy(z, y, reduction=reduction, label_smoothing=smoothing)
    (g_ref,) = torch.autograd.grad(ref * 3.0, z)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(g_ours, g_ref)


def test_autograd_loss_float32_in_a_model():
    torch.manual_seed(1)
    model = torch.nn.Linear(10, 5)
    x, y = torch.randn(64, 10), torch.randint(0, 5, (64,))
    cross_entropy(model(x), y).backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for a, p in zip(ours, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-6)


def test_autograd_loss_without_grad_computes_no_gradient():
    with torch.no_grad():
        loss = cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    assert loss.grad_fn is None and loss.dim() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_loss_on_cuda_uses_the_kernel(dtype):
    if not (torch.cuda.is_available() and K.available("cupy")):
        if REQUIRE_GPU:
            pytest.fail("MPIRT_REQUIRE_GPU=1 but CUDA torch with cupy is not available")
        pytest.skip("needs CUDA torch and cupy")
    torch.manual_seed(2)
    z = torch.randn(300, 1000, device="cuda").to(dtype).requires_grad_()
    y = torch.randint(0, 1000, (300,), device="cuda")
    y[::7] = -100
    ours = cross_entropy(z, y, label_smoothing=0.1)  # auto: the cupy kernel through DLPack
    (g_ours,) = torch.autograd.grad(ours, z)
    ref = F.cross_entropy(z.float(), y, label_smoothing=0.1)
    (g_ref,) = torch.autograd.grad(ref, z)
    assert g_ours.dtype == dtype and g_ours.device == z.device
    assert ours.item() == pytest.approx(ref.item(), rel=1e-4)
    tol = 1e-6 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(g_ours.float(), g_ref.float(), rtol=1e-2, atol=tol)


def test_auto_follows_the_array_type(monkeypatch):
    monkeypatch.delenv(K.ENV, raising=False)
    z = np.zeros((2, 3), np.float32)
    assert K.pick(z) == "numpy" and K.pick(torch.zeros(2, 3)) == "torch"
    res = K.softmax_xent(torch.zeros(2, 3), torch.tensor([0, 1]), grad_scale=1.0)
    assert isinstance(res.grad, torch.Tensor)
    assert K.pick([[1.0, 2.0]]) in ("cupy", "torch")  # plain data: the best backend present


def test_env_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv(K.ENV, "numpy")
    res = K.softmax_xent(torch.zeros(2, 3), torch.tensor([0, 1]), grad_scale=1.0)
    assert isinstance(res.grad, np.ndarray)
    assert res.loss_sum == pytest.approx(2 * np.log(3))
    monkeypatch.setenv(K.ENV, "torch")
    assert isinstance(K.softmax_xent(np.zeros((2, 3), np.float32), [0, 1], grad_scale=1.0).grad, torch.Tensor)


def test_named_backend_converts_and_writes_in_place_where_it_can():
    t = torch.zeros(5)
    K.segment_add(t, np.ones(2, np.float32), 1, backend="numpy")  # a CPU tensor shares its memory
    assert t.tolist() == [0, 1, 1, 0, 0]
    with pytest.raises(TypeError):
        K.segment_add(torch.zeros(4, dtype=torch.bfloat16), np.ones(2, np.float32), backend="numpy")


def test_bad_arguments_raise():
    z = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        K.softmax_xent(z, np.zeros(2, np.int64), backend="fortran")
    with pytest.raises(ValueError, match="2-D"):
        K.softmax_xent(np.zeros(3, np.float32), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="labels must have shape"):
        K.softmax_xent(z, np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="label_smoothing"):
        K.softmax_xent(z, np.zeros(2, np.int64), label_smoothing=1.0)
    with pytest.raises(ValueError, match="k must be"):
        K.predict_topk(z, 4)
    with pytest.raises(ValueError, match="dtype"):
        K.compress(np.zeros(3, np.float32), "fp8")
    with pytest.raises(ValueError):
        K.Bucket([])
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), reduction="none")


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
    assert {os.path.basename(s) for s in sources} >= {"xent.cu", "predict.cu", "pack.cu", "compress.cu", "reduce.cu"}
    procs = [subprocess.Popen([nvcc, "-arch=sm_90", "-cubin", "--std=c++17", "-Xptxas", "-warn-spills",
                               "-o", str(tmp_path / (os.path.basename(s) + ".cubin")), s],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for s in sources]
    for s, p in zip(sources, procs):
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"{os.path.basename(s)} does not compile:\n{out}"
        assert "spill" not in out, f"{os.path.basename(s)} spills registers:\n{out}"
