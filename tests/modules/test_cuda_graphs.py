"""CUDA graphs: the layers' forward and backward can be captured and replayed
(``torch.cuda.make_graphed_callables``, the mechanism behind torch.compile's mode="reduce-overhead"),
which removes the host time per launch that bounds small layers. Capture fails on a host sync, an
allocation outside the graph's memory pool or a host-to-device copy; a replay that differs from an
eager call means a value was baked in at capture (a pointer, a seed, a decision). GPU only."""
import pytest
import torch

from lora_kernels.modules import LoRALinear, NF4LoRALinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

K, N, R = 320, 192, 16


def _layer(cls, k: int = K, n: int = N, r: int = R, dropout: float = 0.0):
    torch.manual_seed(0)
    layer = cls(k, n, r=r, alpha=2 * r, dropout=dropout, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_()  # PEFT's init leaves B at zero: a LoRA term of zero would hide errors
    return layer


def _fwd_bwd(fn, layer, x, dy):
    """(y, dx, dA, dB) of one call of ``fn`` (the layer or its graphed form), gradients from zero."""
    layer.lora_A.grad = layer.lora_B.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    y.backward(dy)
    return [t.detach().clone() for t in (y, x.grad, layer.lora_A.grad, layer.lora_B.grad)]


@pytest.mark.parametrize("M", [4, 300])  # the small-M routes (aten or GEMV) and the GEMM route
@pytest.mark.parametrize("cls", [LoRALinear, NF4LoRALinear], ids=["dense", "nf4"])
def test_graphed_layer_replays_what_eager_computes_cuda(cls, M):
    layer = _layer(cls)
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(M, K, generator=g).to("cuda", torch.bfloat16).requires_grad_(True)
    # make_graphed_callables graphs a module in place (its forward replaced, the same object
    # returned): keep the eager forward to compare with
    eager_forward = layer.forward
    graphed = torch.cuda.make_graphed_callables(layer, (sample,))
    for _ in range(2):  # new inputs each replay: nothing of the capture's inputs is kept
        x = torch.randn(M, K, generator=g).to("cuda", torch.bfloat16)
        dy = torch.randn(M, N, generator=g).to("cuda", torch.bfloat16)
        eager = _fwd_bwd(eager_forward, layer, x, dy)
        replayed = _fwd_bwd(graphed, layer, x, dy)
        for e, o, name in zip(eager, replayed, ("y", "dx", "dA", "dB")):
            assert torch.equal(e, o), name  # the same kernels on the same data


@pytest.mark.parametrize("cls", [LoRALinear, NF4LoRALinear], ids=["dense", "nf4"])
def test_graphed_dropout_draws_a_new_mask_each_replay_cuda(cls):
    # The seed is drawn on the device inside the graph (torch's graph-safe RNG): each replay drops
    # other elements, and its backward regenerates that replay's mask. With A = B = I (K = N = r)
    # and x = +-1, the LoRA term is s * keep * x / (1 - p) = 0 or +-4: the mask can be read off y.
    size, p = 16, 0.5
    layer = _layer(cls, size, size, size, dropout=p)
    with torch.no_grad():
        layer.lora_A.copy_(torch.eye(size))
        layer.lora_B.copy_(torch.eye(size))
    g = torch.Generator().manual_seed(2)
    x = (torch.randint(0, 2, (64, size), generator=g) * 2 - 1).to("cuda", torch.bfloat16)
    dy = torch.randn(64, size, generator=g).to("cuda", torch.bfloat16)
    weight = layer.qweight.dequantize() if cls is NF4LoRALinear else layer.weight
    base = torch.nn.functional.linear(x.float(), weight.float(), layer.bias.float())
    graphed = torch.cuda.make_graphed_callables(layer, (x.clone().requires_grad_(True),))
    masks = []
    for _ in range(2):
        y, dx, _, _ = _fwd_bwd(graphed, layer, x, dy)
        keep = ((y.float() - base).abs() > 2.0).float()  # the term is 0 or +-4 (y's rounding: < 0.1)
        assert 0.3 < keep.mean().item() < 0.7
        expected_dx = dy.float() @ weight.float() + keep / (1 - p) * layer.scale * dy.float()
        err = (dx.float() - expected_dx).norm() / expected_dx.norm()
        assert err < 1e-2, err
        masks.append(keep)
    assert not torch.equal(masks[0], masks[1])
