"""Fixtures shared by the module tests."""
import pytest

from lora_kernels.ops.triton_launch import is_interpreted


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Both CPU backends: the lean PyTorch path and the Triton kernels under the interpreter."""
    if request.param == "triton" and not is_interpreted():
        pytest.skip("the CPU Triton backend needs TRITON_INTERPRET=1")
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", request.param)
    return request.param
