"""The backend plumbing of tests/helpers.py. On a GPU machine every test parametrized over BACKENDS
also runs as "cuda": the helpers must then hand it CUDA tensors, or it silently runs the CPU path.
CUDA is faked here (``torch.cuda.is_available``) and no CUDA tensor is made."""
import torch

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
