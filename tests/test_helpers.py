"""The backend plumbing of tests/helpers.py. On a GPU machine every test parametrized over BACKENDS
also runs as "cuda": the helpers must then hand it CUDA tensors, or it silently runs the CPU path.
CUDA is faked here (``torch.cuda.is_available``) and no CUDA tensor is made. Then the NF4 helpers:
references on bitsandbytes' decode, block sizes passed through."""
import os

import pytest
import torch

import lora_kernels
from tests import helpers


def test_use_backend_sets_the_device_of_helper_tensors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cpu = torch.device("cpu")
    assert helpers.default_device() == cpu
    with helpers.use_backend("cuda") as record:
        assert record.device.type == "cuda" and helpers.default_device() == record.device
        # the cuda backend runs the Triton kernels (recorded as "triton"), empty problems the torch path
        assert record.impl == "triton" and record.expected_impl(4, 5, 6, 2) == "triton"
        assert record.expected_impl(0, 5, 6, 2) == "torch"
        with helpers.use_backend("torch") as inner:  # nested: the inner backend's device, then back
            assert helpers.default_device() == cpu and inner.impl == "torch"
        assert helpers.default_device() == record.device
    assert helpers.default_device() == cpu


def test_cuda_backend_pins_the_small_m_routes_off_and_restores_them(monkeypatch):
    """The "cuda" backend is the Triton kernels at every M: neither the dense small-M PyTorch route nor
    the CUDA NF4 GEMV (on by default up to 32 rows) may take its calls (tests count the Triton calls);
    the caller's settings come back after it."""
    from lora_kernels.ops.lora_linear import DENSE_TORCH_MAX_M_ENV
    from lora_kernels.ops.nf4_gemv import NF4_GEMV_ENV
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(NF4_GEMV_ENV, "16")
    monkeypatch.delenv(DENSE_TORCH_MAX_M_ENV, raising=False)
    with helpers.use_backend("cuda"):
        assert os.environ[NF4_GEMV_ENV] == "0" and os.environ[DENSE_TORCH_MAX_M_ENV] == "0"
    assert os.environ[NF4_GEMV_ENV] == "16" and DENSE_TORCH_MAX_M_ENV not in os.environ


def test_helpers_follow_the_backend_device():
    with helpers.use_backend("torch") as record:
        pb = helpers.make_problem((3,), 8, 5, 2)
        assert {t.device for t in (pb.x_leaf, pb.weight, pb.lora_A, pb.lora_B)} == {record.device}
        assert helpers.make_grad_y(pb).device == record.device
        torch.manual_seed(5)
        drawn = torch.randint(0, helpers.SEED_HIGH, (1,), dtype=torch.int64)  # what lora_linear draws
        assert torch.equal(helpers.seed_after_manual_seed(5), drawn)


def test_rng_state_reads_the_generator_of_the_device(monkeypatch):
    cuda_state = torch.tensor([7], dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": cuda_state)
    assert helpers.rng_state("cuda") is cuda_state
    assert torch.equal(helpers.rng_state("cpu"), torch.get_rng_state())


def test_nf4_problem_reference_is_the_bitsandbytes_decode(monkeypatch):
    """An NF4 problem's reference weight is bitsandbytes' decode of the quantized weight (rounded to its
    stored dtype, then to x's), not NF4Weight.dequantize(): on CUDA that runs lora_kernels' own Triton
    decode, which the tests must not check against itself. A wrong dequantize() here changes nothing."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    from lora_kernels.integrations.bitsandbytes import nf4_to_bnb

    monkeypatch.setattr(lora_kernels.NF4Weight, "dequantize",
                        lambda self, dtype=None: torch.zeros(self.shape, dtype=dtype or self.dtype))
    pb = helpers.make_problem((3,), 128, 24, 2, torch.bfloat16, seed=3,
                              nf4=dict(weight_dtype=torch.float32, blocksize=32, nested_blocksize=4))
    params, state = nf4_to_bnb(pb.qweight)
    expected = bnb_f.dequantize_4bit(params.data, state).reshape(24, 128).to(torch.bfloat16)
    assert pb.weight.dtype == torch.bfloat16 and torch.equal(pb.weight, expected)
    assert pb.qweight.blocksize == 32 and pb.qweight.nested_blocksize == 4


def test_nf4_op_inputs_take_block_sizes():
    args, q = helpers.nf4_gemv_inputs(2, 256, 20, 4, torch.bfloat16, torch.bfloat16, False, blocksize=128,
                                      nested_blocksize=4)
    assert (q.blocksize, q.nested_blocksize) == (128, 4) and args[-3:-1] == (128, 4)
    args, q = helpers.nf4_grad_input_args(2, 20, 256, torch.float32, False, blocksize=256, nested_blocksize=8)
    assert (q.blocksize, q.nested_blocksize) == (256, 8) and args[-3:-1] == (256, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_poisoned_memory_fills_new_tensors(dtype):
    """The poisoned tests rely on torch.empty handing out NaN (integers: their max) inside
    ``poisoned_memory``: a kernel that leaves an element unwritten then fails the float64 checks. If
    torch dropped that behaviour, every poisoned test would silently lose it. Outside, nothing is
    filled (the previous settings come back)."""
    fill = torch.iinfo(dtype).max if not dtype.is_floating_point else None
    before = torch.are_deterministic_algorithms_enabled()
    with helpers.poisoned_memory():
        for t in (torch.empty(37, 5, dtype=dtype), torch.empty_like(torch.ones(3, dtype=dtype)),
                  torch.ones(8, dtype=dtype).new_empty(11)):
            assert (t.isnan().all() if fill is None else (t == fill).all()), t
    assert torch.are_deterministic_algorithms_enabled() == before
