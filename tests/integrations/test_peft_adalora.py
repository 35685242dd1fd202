"""AdaLoRA (PEFT's SVD-form layers) on lora_kernels: patch_peft_model swaps adalora.SVDLinear and
adalora.bnb.SVDLinear4bit; outputs, gradients (A, B and E), the orthogonality loss and the rank
allocator's pruning steps match PEFT."""
import copy
import math

import pytest
import torch

import lora_kernels
from lora_kernels.integrations.peft import build_peft_layer
from tests.helpers import assert_close, use_backend
from tests.integrations.test_peft_patch import (TARGETS, _ids, _to_qlora, check_scaling_writes_are_followed, tiny_llama,
                                                train_side_by_side)

peft = pytest.importorskip("peft")

BOUND = 1e-5


@pytest.fixture(autouse=True)
def _torch_cpu_path(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "torch")


def adalora_model(qlora=False, seed=0, dropout=0.0, total_step=8):
    model = tiny_llama(hidden=128, intermediate=256, seed=seed) if qlora else tiny_llama(seed=seed)
    if qlora:
        model = _to_qlora(model)
    cfg = peft.AdaLoraConfig(init_r=6, target_r=3, tinit=1, tfinal=2, deltaT=1, total_step=total_step, lora_alpha=8,
                             target_modules=TARGETS, lora_dropout=dropout, orth_reg_weight=0.5)
    model = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # PEFT starts E at zero (ΔW = 0, no gradient for A, B): make every term non-trivial
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "qlora"])
def test_patched_adalora_matches_peft(qlora, backend):
    reference = adalora_model(qlora)
    patched = copy.deepcopy(reference)
    report = lora_kernels.patch_peft_model(patched)
    kind = "adalora.bnb.SVDLinear4bit" if qlora else "adalora.SVDLinear"
    assert report.swapped == {kind: 14} and not report.left_on_peft
    ids = _ids(vocab=100)
    with use_backend(backend) as record:
        out, ref = patched(input_ids=ids, labels=ids), reference(input_ids=ids, labels=ids)
        assert_close(out.logits, ref.logits, BOUND, "logits")
        # AdaLoraModel adds the orthogonality regulariser to the loss: same loss, same gradients
        assert math.isclose(out.loss.item(), ref.loss.item(), rel_tol=BOUND)
        out.loss.backward()
        ref.loss.backward()
    assert len(record.impls("fwd")) == 14 and len(record.impls("bwd")) == 14
    grads, ref_grads = _grads(patched), _grads(reference)
    assert grads.keys() == ref_grads.keys()
    assert {k.split(".")[-2] for k in grads} >= {"lora_A", "lora_B", "lora_E"}
    for name in grads:
        assert_close(grads[name], ref_grads[name], BOUND, name)


def test_rank_allocator_steps_match():
    """Training with update_and_allocate (importance scores, budget schedule, masking E) gives the
    same losses and the same pruned ranks on the patched model as on PEFT's."""
    reference = adalora_model(seed=4, total_step=6)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    train_side_by_side((patched, reference), steps=6, lr=2e-2, rel_tol=1e-4, first_seed=20,
                       after_step=lambda model, step: model.base_model.update_and_allocate(step))
    masks = [[int((p == 0).sum()) for n, p in m.named_parameters() if "lora_E" in n] for m in (patched, reference)]
    assert masks[0] == masks[1] and sum(masks[0]) > 0  # the budget schedule pruned ranks, identically


def test_ranknum_is_read_again_after_an_in_place_change():
    reference = adalora_model(seed=1)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    ids = _ids(vocab=100)
    patched(input_ids=ids)  # keeps ranknum's value

    def set_ranknum(value, new_tensor):
        for m in (patched, reference):
            for module in m.modules():
                if hasattr(module, "ranknum") and "default" in module.ranknum:
                    if new_tensor:  # as PEFT's update_layer makes one (maybe at a freed one's address)
                        module.ranknum["default"] = torch.nn.Parameter(torch.full((1,), value), requires_grad=False)
                    else:
                        with torch.no_grad():
                            module.ranknum["default"].fill_(value)  # in place: the version counter moves
        with torch.no_grad():
            assert_close(patched(input_ids=ids).logits, reference(input_ids=ids).logits, BOUND, f"ranknum {value}")

    set_ranknum(3.0, new_tensor=False)
    set_ranknum(5.0, new_tensor=True)


@pytest.mark.parametrize("inference_mode", [False, True], ids=["grad_mode", "inference_mode"])
def test_scaling_tensors_as_peft_s_hotswap_preparation_makes_them(inference_mode):
    """PEFT's hotswap preparation turns a LoRA layer's scaling into a 0-d tensor, written in place by a
    hotswap (for AdaLoRA's layers, whose scaling is an int alpha, PEFT's conversion refuses; PEFT's
    forward still takes a tensor). Made under inference_mode, the tensor is folded into A x E."""
    with torch.inference_mode(inference_mode):
        reference = adalora_model(seed=2)
        for module in reference.modules():
            if isinstance(module, peft.tuners.adalora.AdaLoraLayer):
                module.scaling["default"] = torch.tensor(float(module.scaling["default"]))
        patched = copy.deepcopy(reference)
        lora_kernels.patch_peft_model(patched)
        check_scaling_writes_are_followed(patched, reference, _ids(vocab=100), 3.0)  # AdaLoRA's are LoraLayers


def test_unpatch_restores_adalora():
    model = adalora_model()
    classes = {n: type(m) for n, m in model.named_modules()}
    lora_kernels.patch_peft_model(model, lora_fa=True)
    frozen = [p.requires_grad for n, p in model.named_parameters() if "lora_A" in n]
    assert frozen and not any(frozen)
    assert lora_kernels.unpatch_peft_model(model) == 14
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_svd_layer_against_float64(backend):
    """One patched SVDLinear against the float64 AdaLoRA formula y = x W^T + b + x (A ⊙ E)^T B^T α / (r + 1e-5),
    with the gradients of x, A, E and B."""
    from peft.tuners.adalora.layer import SVDLinear
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40)
    cfg = peft.AdaLoraConfig(init_r=5, target_r=2, lora_alpha=6, total_step=10, target_modules=["x"])
    layer = build_peft_layer(SVDLinear, base, cfg, r=5, lora_alpha=6)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (layer.lora_A["default"], layer.lora_B["default"], layer.lora_E["default"]):
            p.copy_(torch.randn(p.shape, generator=g))
    lora_kernels.patch_peft_model(torch.nn.Sequential(layer))
    x = torch.randn(3, 7, 48, generator=g).requires_grad_(True)
    with use_backend(backend) as record:
        y = layer(x)
        dy = torch.randn(y.shape, generator=g)
        y.backward(dy)
    assert len(record.impls("fwd")) == 1
    x64 = x.detach().double().requires_grad_(True)
    A, B, E = (t.detach().double().requires_grad_(True) for t in
               (layer.lora_A["default"], layer.lora_B["default"], layer.lora_E["default"]))
    y64 = x64 @ base.weight.double().t() + base.bias.double() + (x64 @ (A * E).t() @ B.t()) * 6 / (5 + 1e-5)
    y64.backward(dy.double())
    assert_close(y, y64, BOUND, "y")
    for got, ref, name in ((x.grad, x64.grad, "dx"), (layer.lora_A["default"].grad, A.grad, "dA"),
                           (layer.lora_E["default"].grad, E.grad, "dE"), (layer.lora_B["default"].grad, B.grad, "dB")):
        assert_close(got, ref, BOUND, name)


class _FixedMask(torch.nn.Module):
    """Inverted dropout with a given keep mask [..., K]: in a PEFT layer in place of its nn.Dropout, so
    PEFT's own forward applies the mask lora_kernels drew (its masks come from a seed, not from PEFT's
    nn.Dropout and torch's RNG: the two cannot draw the same mask)."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.view(x.shape).to(x.dtype) / (1 - self.p)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "fp16", "bf16", "bf16_fp32_adapters"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.usefixtures("poisoned")
def test_svd_layer_with_dropout_in_16_bit_matches_peft_in_float64(backend, dtypes):
    """lora_dropout > 0, in fp32 and 16-bit (adapters in the base's dtype, or fp32 as PEFT's
    autocast_adapter_dtype keeps them): the patched SVDLinear against PEFT's own SVDLinear run in float64
    with the same keep mask, for y and the gradients of x, A, E, B and the base bias."""
    from peft.tuners.adalora.layer import SVDLinear
    from tests.helpers import BOUNDS, keep_mask_for, rel_err
    dtype, adapter_dtype = dtypes
    p, (K, N), lead = 0.3, (48, 40), (3, 7)
    torch.manual_seed(0)
    base = torch.nn.Linear(K, N).to(dtype)
    cfg = peft.AdaLoraConfig(init_r=5, target_r=2, lora_alpha=6, total_step=10, target_modules=["x"], lora_dropout=p)
    layer = build_peft_layer(SVDLinear, base, cfg, r=5, lora_alpha=6)
    g = torch.Generator().manual_seed(1)
    adapters = [layer.lora_A["default"], layer.lora_B["default"], layer.lora_E["default"]]
    with torch.no_grad():  # random E (PEFT's zeros would hide A and B) and B; in the adapter dtype
        for t in adapters:
            t.data = torch.randn(t.shape, generator=g).to(adapter_dtype)
    layer.train()
    reference = copy.deepcopy(layer)
    lora_kernels.patch_peft_model(torch.nn.Sequential(layer))
    x = torch.randn(*lead, K, generator=g).to(dtype).requires_grad_(True)
    with use_backend(backend) as record:
        torch.manual_seed(123)
        y = layer(x)
        dy = torch.randn(y.shape, generator=g).to(dtype)
        y.backward(dy)
    assert record.impls() == [backend] * 2  # the fast path, with dropout, on this backend
    assert y.dtype == dtype and x.grad.dtype == dtype
    keep = keep_mask_for(123, 21, K, p).view(*lead, K)
    reference.lora_dropout["default"] = _FixedMask(keep, p)
    reference = reference.double()
    x64 = x.detach().double().requires_grad_(True)
    y64 = reference(x64)
    y64.backward(dy.double())
    # PEFT's float64 forward is the AdaLoRA formula with this mask
    A, B, E = (reference.get_parameter(f"{n}.default").detach() for n in ("lora_A", "lora_B", "lora_E"))
    formula = (x64.detach() @ reference.base_layer.weight.t() + reference.base_layer.bias
               + ((x64.detach() * keep / (1 - p)) @ (A * E).t() @ B.t()) * 6 / (5 + 1e-5))
    assert rel_err(formula, y64) < 1e-12
    bound = BOUNDS[dtype]
    assert_close(y, y64, bound, "y")
    for name, got, ref in (("dx", x.grad, x64.grad), ("dbias", base.bias.grad, reference.base_layer.bias.grad),
                           *((f"d{n}", a.grad, reference.get_parameter(f"{n}.default").grad)
                             for n, a in zip(("lora_A", "lora_B", "lora_E"), adapters))):
        assert got is not None and ref is not None, name
        assert_close(got, ref, bound, name)
    assert all(a.grad.dtype == adapter_dtype for a in adapters)
    # the mask matters: without it (or with another seed's) the output is far off
    for other in (torch.ones_like(keep), keep_mask_for(124, 21, K, p).view(*lead, K)):
        reference.lora_dropout["default"] = _FixedMask(other, 0.0 if other.all() else p)
        with torch.no_grad():
            assert rel_err(y, reference(x64)) > 10 * bound
