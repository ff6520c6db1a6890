"""Kernel tests: CPU tests run the Triton kernels through the interpreter on float32 inputs at small sizes
(bf16 is not faithful there); `gpu` tests check bf16/fp8 numerics on the GPU."""
import os

import torch

if not torch.cuda.is_available():
    # Triton's interpreter must be chosen before triton is imported; the kernels still run only where a test asks
    # for them (the `interpret` fixture sets DSAFORGE_KERNELS=interpret), so other packages keep the reference path.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def interpret(monkeypatch):
    """Run Triton kernels on CPU tensors through Triton's interpreter."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 must be set before triton is imported")
    monkeypatch.setenv("DSAFORGE_KERNELS", "interpret")
    from dsaforge.kernels import _dispatch
    _dispatch.patch_interpreter()
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _report(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    """Print max and mean absolute error and return the max (tests print their error)."""
    diff = (got.double() - want.double()).nan_to_num(0.0, 0.0, 0.0).abs()
    print(f"{name}: max abs err {diff.max().item():.3e}, mean {diff.mean().item():.3e}")
    return diff.max().item()


@pytest.fixture
def report():
    return _report



