"""What the autograd functions keep for backward by reference (the frozen weight, the adapters, x)
goes through save_for_backward, so an in-place change between forward and backward is refused by
autograd's version check, as for PyTorch's own layers, instead of giving gradients computed from
the new values. DoRA's magnitude is not kept: its gradients use the forward's m / ||W + sBA||."""
import pytest
import torch

import lora_kernels

VERSION_ERROR = "modified by an inplace operation"


def _dense(g):
    x = torch.randn(5, 16, generator=g).requires_grad_(True)
    W = torch.randn(12, 16, generator=g) / 4
    A = (torch.randn(4, 16, generator=g) / 4).requires_grad_(True)
    B = torch.randn(12, 4, generator=g).requires_grad_(True)
    return x, W, A, B


@pytest.mark.parametrize("changed", ["x", "weight", "lora_A", "lora_B"])
@pytest.mark.parametrize("function", ["lora_linear", "nf4_lora_linear", "dora_linear"])
def test_in_place_change_of_a_saved_input_is_refused(backend, function, changed):
    g = torch.Generator().manual_seed(3)
    x, W, A, B = _dense(g)
    x, A, B = (t.detach().to(backend.device).requires_grad_(True) for t in (x, A, B))
    W = W.to(backend.device)
    if function == "nf4_lora_linear":
        x = torch.randn(5, 64, generator=g).to(backend.device).requires_grad_(True)
        A = (torch.randn(4, 64, generator=g) / 8).to(backend.device).requires_grad_(True)
        weight = lora_kernels.NF4Weight.quantize(torch.randn(12, 64, generator=g).to(backend.device))
        stored = weight.op_tensors()[0]  # the packed codes
        y = lora_kernels.nf4_lora_linear(x, weight, A, B, 2.0, dropout_p=0.25)
    elif function == "dora_linear":
        stored = W
        y = lora_kernels.dora_linear(x, W, A, B, torch.rand(12, device=backend.device), 2.0)
    else:
        stored = W
        y = lora_kernels.lora_linear(x, W, A, B, 2.0, dropout_p=0.25)
    target = {"x": x, "weight": stored, "lora_A": A, "lora_B": B}[changed]
    with torch.no_grad():
        target.add_(1)
    with pytest.raises(RuntimeError, match=VERSION_ERROR):
        y.sum().backward()


def test_dora_magnitude_changed_after_forward_keeps_the_forward_gradients(backend):
    g = torch.Generator().manual_seed(5)
    x, W, A, B = (t.to(backend.device) for t in _dense(g))
    x, A, B = (t.detach().requires_grad_(True) for t in (x, A, B))
    magnitude = (torch.rand(12, generator=g) + 0.5).to(backend.device).requires_grad_(True)
    grad_y = torch.randn(5, 12, generator=g).to(backend.device)

    def grads(change_after_forward):
        for t in (x, A, B, magnitude):
            t.grad = None
        y = lora_kernels.dora_linear(x, W, A, B, magnitude, 2.0)
        if change_after_forward:
            with torch.no_grad():
                magnitude.mul_(3)
        y.backward(grad_y)
        if change_after_forward:
            with torch.no_grad():
                magnitude.div_(3)
        return [t.grad.clone() for t in (x, A, B, magnitude)]

    for unchanged, changed in zip(grads(False), grads(True)):
        torch.testing.assert_close(changed, unchanged, rtol=0, atol=0)
