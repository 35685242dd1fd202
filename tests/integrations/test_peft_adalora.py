"""AdaLoRA (PEFT's SVD-form layers) on lora_kernels: patch_peft_model swaps adalora.SVDLinear and
adalora.bnb.SVDLinear4bit; outputs, gradients (A, B and E), the orthogonality loss and the rank
allocator's pruning steps match PEFT."""
import copy
import math

import pytest
import torch

import lora_kernels
from tests.helpers import assert_close, use_backend
from tests.integrations.test_peft_patch import TARGETS, _ids, _to_qlora, tiny_llama, train_side_by_side

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
    layer = SVDLinear(base, "default", cfg, r=5, lora_alpha=6)
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
