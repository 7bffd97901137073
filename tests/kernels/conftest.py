"""Kernel tests run the Triton paths through Triton's CPU interpreter when there is no GPU.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so it must be set before any kernel module is
imported; pytest imports this conftest before the test modules of this folder. The kernels import triton lazily,
so importing ``salience.kernels`` elsewhere first does no harm.

``SALIENCE_TEST_DEVICE=cuda`` (what ``make gpu-check`` sets) asks for the compiled kernels on the GPU: the
interpreter is not switched on, and a Triton-path test fails, rather than skips, when torch sees no CUDA device.
Unset, the device follows the machine as described above.
"""

import os

import pytest
import torch

#: environment variable that pins the Triton-path tests to CUDA (``cuda``) or leaves the choice to the machine (unset)
DEVICE_SWITCH = "SALIENCE_TEST_DEVICE"
REQUESTED_DEVICE = os.environ.get(DEVICE_SWITCH, "")
if REQUESTED_DEVICE not in ("", "cuda"):
    raise pytest.UsageError(f"{DEVICE_SWITCH}={REQUESTED_DEVICE!r}: set it to cuda, or leave it unset")
if REQUESTED_DEVICE == "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise pytest.UsageError(f"{DEVICE_SWITCH}=cuda tests the compiled kernels: unset TRITON_INTERPRET")

if not REQUESTED_DEVICE and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
    """The device Triton-path tests put their tensors on; skips the test when Triton cannot run here (fails instead
    when ``SALIENCE_TEST_DEVICE=cuda`` asked for a GPU that torch does not see)."""
    if REQUESTED_DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"{DEVICE_SWITCH}=cuda, but torch {torch.__version__} sees no CUDA device")
    if not triton_runnable():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    return kernel_device()
