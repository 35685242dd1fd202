"""``seeded_dropout``: inverted dropout with the fused kernels' mask, regenerated from its seed in
backward (autograd keeps 8 bytes, not the mask); the same seed drops the same elements as
``lora_linear``'s own dropout."""
import pytest
import torch

import lora_kernels
from lora_kernels.autograd import seeded_dropout
from tests.helpers import assert_close, keep_mask_for

pytestmark = pytest.mark.usefixtures("poisoned")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _x(dtype=torch.float32, layout="contiguous", device="cpu"):
    g = torch.Generator().manual_seed(2)
    if layout == "transposed":  # [3, 7, 33] with the last two dims swapped in memory
        x = torch.randn(3, 33, 7, generator=g).transpose(1, 2)
    else:
        x = torch.randn(3, 7, 33, generator=g)
    return x.to(device, dtype).requires_grad_(True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradient_use_the_seeded_mask(dtype, layout, device):
    x, p = _x(dtype, layout, device), 0.3
    saved = []
    torch.manual_seed(5)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = seeded_dropout(x, p)
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.int64, 1)]  # the seed, never the mask
    scaled = keep_mask_for(5, 21, 33, p, device=device).view(x.shape).to(dtype) * (1 / (1 - p))
    assert torch.equal(y, x.detach() * scaled)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).to(device, dtype)
    y.backward(grad)
    assert torch.equal(x.grad, grad * scaled)
    dropped = (y == 0).float().mean().item()
    assert 0.2 < dropped < 0.4


def test_same_seed_same_elements_as_lora_linear():
    g = torch.Generator().manual_seed(7)
    x, W = torch.randn(9, 40, generator=g), torch.randn(24, 40, generator=g) / 7
    A, B = torch.randn(4, 40, generator=g) / 7, torch.randn(24, 4, generator=g)
    torch.manual_seed(3)
    fused = lora_kernels.lora_linear(x, W, A, B, 0.5, dropout_p=0.4)
    torch.manual_seed(3)
    d = seeded_dropout(x, 0.4)
    expected = x.double() @ W.double().t() + 0.5 * d.double() @ A.double().t() @ B.double().t()
    assert_close(fused, expected, 1e-6, "y")


def test_identity_when_not_training_or_p_zero():
    x = _x()
    assert seeded_dropout(x, 0.5, training=False) is x
    assert seeded_dropout(x, 0.0) is x


@pytest.mark.parametrize("x, p, exc, match", [
    (torch.ones(2, 3), 1.0, ValueError, "p must"),
    (torch.ones(2, 3), -0.1, ValueError, "p must"),
    (torch.ones(2, 3), True, TypeError, "p must"),
    (torch.ones(2, 3, dtype=torch.int64), 0.5, TypeError, "x must"),
    ([1.0, 2.0], 0.5, TypeError, "x must"),
    (torch.tensor(1.5), 0.5, ValueError, "x must have shape"),
])
def test_bad_arguments(x, p, exc, match):
    with pytest.raises(exc, match=match):
        seeded_dropout(x, p)


def test_0d_x_passes_through_when_nothing_is_dropped():
    x = torch.tensor(1.5)  # as F.dropout: any shape when no mask is drawn
    assert seeded_dropout(x, 0.5, training=False) is x and seeded_dropout(x, 0.0) is x


def test_torch_func_and_compile():
    x = _x().detach()
    y = torch.func.vmap(lambda row: seeded_dropout(row, 0.5), randomness="different")(x)
    assert y.shape == x.shape and not torch.equal(y[0], y[1]) and ((y == 0) | (y == 2 * x)).all()
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: seeded_dropout(t, 0.5).square().sum(), backend="aot_eager", fullgraph=True)
    xs = x.clone().requires_grad_(True)
    torch.manual_seed(9)
    compiled(xs).backward()
    scaled = keep_mask_for(9, 21, 33, 0.5).view(x.shape).float() * 2
    assert_close(xs.grad, 2 * x * scaled * scaled, 1e-6, "compiled gradient")
