"""Kernel tests run the Triton paths through Triton's CPU interpreter when there is no GPU.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so it must be set before any kernel module is
imported; pytest imports this conftest before the test modules of this folder. The kernels import triton lazily,
so importing ``salience.kernels`` elsewhere first does no harm.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def triton_runnable() -> bool:
    """Triton kernels run here: on a GPU, or through the interpreter on CPU tensors."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    return torch.cuda.is_available()


def kernel_device() -> str:
    """Device for Triton-path tensors: CPU under the interpreter, else CUDA."""
    return "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"


@pytest.fixture
def triton_device() -> str:
    """The device Triton-path tests put their tensors on; skips the test when Triton cannot run here."""
    if not triton_runnable():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    return kernel_device()
