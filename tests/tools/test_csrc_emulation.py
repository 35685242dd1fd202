"""The CPU emulation of csrc/'s kernels (lora_kernels/tools/csrc_emulation.py): its mma follows the PTX
ISA's fragment layout, it reports the rule-breaking kernels it exists to catch, its guard bands see a
write past an output, and its wrappers reject what the ops reject. The kernels themselves: tests/csrc/."""
import pytest
import torch

from lora_kernels.tools import csrc_emulation as emulation
from tests.helpers import assert_close, nf4_gemv_inputs

pytestmark = pytest.mark.skipif(emulation.available() is not None,
                                reason=f"csrc emulation unavailable: {emulation.available()}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_mma_follows_the_ptx_fragment_layout(dtype):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 16, generator=g).to(dtype)
    b = torch.randn(16, 8, generator=g).to(dtype)
    d = emulation.emulated_mma(a, b, dtype)
    assert_close(d, a.double() @ b.double(), 1e-6, "D")


@pytest.mark.parametrize("probe,message", [("divergent barrier", "deadlock"),
                                           ("read before cp.async wait", "cp.async of this thread has not landed"),
                                           ("load past the input", "outside every input")])
def test_emulation_reports_a_broken_rule(probe, message):
    error = emulation.rule_probe(probe)
    assert error is not None and message in error, error


def test_guard_bands_catch_a_write_past_an_output():
    out = emulation._Guarded(shape=(3, 5), dtype=torch.bfloat16)
    out.view.fill_(1.0)
    out.check_untouched("out")  # writing the tensor itself is fine
    out.buffer[out.start + out.span] = 2.0
    with pytest.raises(RuntimeError, match="wrote outside out"):
        out.check_untouched("out")


def test_wrapper_rejects_what_the_ops_reject():
    args, _ = nf4_gemv_inputs(2, 320, 16, 4, torch.bfloat16, torch.bfloat16, False)
    with pytest.raises(ValueError, match="tensor-core kernel needs K % 256"):
        emulation.nf4_gemv_lora(*args, 1)
    args, _ = nf4_gemv_inputs(17, 256, 16, 4, torch.bfloat16, torch.bfloat16, False)
    with pytest.raises(ValueError, match="1 <= M <= 16"):
        emulation.nf4_gemv_lora(*args, 0)


def test_unavailable_without_the_cuda_headers(monkeypatch):
    monkeypatch.setattr(emulation, "find_nvcc", lambda: None)
    assert "CUDA toolkit headers" in emulation.available()
