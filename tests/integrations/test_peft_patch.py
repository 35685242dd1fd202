"""patch_peft_model on a small Llama built from a transformers config (random init, no download):
same logits, gradients and optimizer trajectory as PEFT, fallbacks to PEFT's own forward, adapter
files, merge_and_unload, unpatch, LoRA-FA and saved-activation memory."""
import collections
import copy
import importlib.util
import math
import os

import pytest
import torch

import lora_kernels
from lora_kernels.integrations import peft as lk_peft
from lora_kernels.kernels import major_minor
from tests.helpers import assert_close, use_backend

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

@pytest.fixture(autouse=True)
def _torch_cpu_path(monkeypatch):
    # The lean PyTorch path unless a test asks for the Triton kernels (interpreted, slow on a model).
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "torch")


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BOUND = 1e-5  # fp32, relative error

_TORCH_VERSION = major_minor(torch.__version__)
_TRANSFORMERS_MAJOR = major_minor(transformers.__version__)[0]
# Seen with torch 2.8 (the floor pyproject.toml accepts), not with 2.11 or 2.13; plain PEFT as well:
# these are torch's and transformers' behaviour there, not lora_kernels'.
needs_dynamo_through_transformers_5 = pytest.mark.skipif(
    _TORCH_VERSION < (2, 9) and _TRANSFORMERS_MAJOR >= 5,
    reason="torch < 2.9's dynamo graph-breaks inside transformers 5's config (plain PEFT too)")
needs_fsdp2_matching_one_process = pytest.mark.skipif(
    _TORCH_VERSION < (2, 9),
    reason="torch < 2.9's FSDP2 on gloo trains plain PEFT to other values than one process does")


def tiny_llama(hidden=64, intermediate=128, layers=2, vocab=100, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab)
    return transformers.LlamaForCausalLM(cfg).float()


def _to_qlora(model, quant_storage=torch.uint8, quant_type="nf4", double_quant=True):
    """Replace the targeted nn.Linear layers with bitsandbytes NF4 Linear4bit (quantized on CPU), as
    transformers loads them (the parameter knows its module, which then keeps the quant_state:
    FSDP2 needs that, and a float quant_storage, to shard the packed weight)."""
    bnb = pytest.importorskip("bitsandbytes")
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in TARGETS:
                lin = getattr(parent, name, None)
                if lin is None:
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=torch.float32, quant_type=quant_type,
                                      compress_statistics=double_quant, quant_storage=quant_storage)
                q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                             compress_statistics=double_quant, quant_storage=quant_storage, module=q)
                setattr(parent, name, q.to("cpu"))  # .to quantizes
    model.is_loaded_in_4bit = True  # what transformers sets: PEFT then wraps in lora.bnb.Linear4bit
    return model


def peft_model(qlora=False, dropout=0.0, seed=0, quant_storage=torch.uint8, quant_type="nf4", double_quant=True,
               **lora_kwargs):
    # K a multiple of 64 for QLoRA: bnb 0.50.2's native CPU dequantize mis-scales rows otherwise.
    model = tiny_llama(hidden=128, intermediate=256, seed=seed) if qlora else tiny_llama(seed=seed)
    if qlora:
        model = _to_qlora(model, quant_storage, quant_type, double_quant)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=dropout,
                          init_lora_weights=False, **lora_kwargs)  # B random: every gradient is non-trivial
    return peft.get_peft_model(model, cfg)


def _ids(seed=1, batch=2, seq=9, vocab=100):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _lora_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def _compare_step(patched, reference, ids):
    out, ref = patched(input_ids=ids, labels=ids), reference(input_ids=ids, labels=ids)
    assert_close(out.logits, ref.logits, BOUND, "logits")
    out.loss.backward()
    ref.loss.backward()
    grads, ref_grads = _lora_grads(patched), _lora_grads(reference)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert_close(grads[name], ref_grads[name], BOUND, name)


def _fast_calls(record):
    return len(record.impls("fwd"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "qlora"])
def test_patched_matches_peft(qlora, backend):
    reference = peft_model(qlora=qlora)
    patched = copy.deepcopy(reference)
    report = lora_kernels.patch_peft_model(patched)
    kind = "lora.bnb.Linear4bit" if qlora else "lora.Linear"
    assert report.swapped == {kind: 14} and not report.left_on_peft and report.num_swapped == 14
    names = [n for n, _ in patched.named_parameters()]
    assert names == [n for n, _ in reference.named_parameters()]
    with use_backend(backend) as record:
        _compare_step(patched, reference, _ids(vocab=100))
    assert _fast_calls(record) == 14  # every LoRA layer ran lora_kernels' op
    assert len(record.impls("bwd")) == 14


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "qlora"])
def test_lora_bias_runs_fused_and_matches_peft(qlora, backend):
    """PEFT's lora_bias=True (a bias on lora_B, scaled with its product: s (B A x + b_B)) runs on the
    fast path, b_B in the kernels' epilogue, with PEFT's outputs and gradients, b_B's included."""
    reference = peft_model(qlora=qlora, lora_bias=True)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        biases = [m for n, m in reference.named_parameters() if "lora_B" in n and n.endswith(".bias")]
        assert len(biases) == 14
        for b in biases:  # PEFT starts b_B at zero: random values make it count
            b.copy_(0.02 * torch.randn(b.shape, generator=gen))  # the scale of the model's own weights
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    with use_backend(backend) as record:
        _compare_step(patched, reference, _ids(vocab=100))
    assert _fast_calls(record) == 14
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in patched.named_parameters() if "lora_B" in n and n.endswith(".bias"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dora,double_quant", [(False, False), (True, True)], ids=["lora", "dora-double_quant"])
def test_fp4_qlora_runs_fused_and_matches_peft(dora, double_quant, backend):
    """QLoRA on bitsandbytes' FP4 weights takes the fast path: the same kernels with FP4's table, PEFT's
    outputs and gradients. The LoRA case has the rest of transformers' 4-bit defaults: no double
    quantization, an fp32 compute dtype."""
    reference = peft_model(qlora=True, quant_type="fp4", double_quant=double_quant, use_dora=dora)
    patched = copy.deepcopy(reference)
    report = lora_kernels.patch_peft_model(patched)
    assert report.swapped == {"lora.bnb.Linear4bit": 14} and not report.left_on_peft
    with use_backend(backend) as record:
        _compare_step(patched, reference, _ids(vocab=100))
    assert _fast_calls(record) == 14 * (2 if dora else 1)  # QLoRA DoRA: W A^T for the norm on the 4-bit GEMM too
    layer = patched.base_model.model.model.layers[0].self_attn.q_proj
    assert lora_kernels.integrations.peft.fallback_reason(layer, torch.randn(2, 128)) is None


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_qlora_large_m_forward_decodes_its_slabs_with_bitsandbytes_kernel(monkeypatch, quant_type):
    """The bnb Linear4bit layers' tables reach the slab decode as the tensors their NF4 view checked
    (``ops.nf4.checked_quant_type``), so the patched model's large-M forward takes bitsandbytes' kernel
    (LORA_KERNELS_NF4_SLAB_DECODER=bnb: what ``auto`` does on CUDA), with PEFT's outputs and gradients."""
    from lora_kernels.ops import triton_launch
    reference = peft_model(qlora=True, quant_type=quant_type)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    monkeypatch.setenv("LORA_KERNELS_NF4_SLAB_DECODER", "bnb")
    monkeypatch.setenv(triton_launch.NF4_CUBLAS_MIN_M_ENV, "1")
    calls = []
    real = triton_launch.bnb_dequantize_rows
    monkeypatch.setattr(triton_launch, "bnb_dequantize_rows", lambda *a: (calls.append(a[3]), real(*a))[1])
    with use_backend("triton") as record:
        _compare_step(patched, reference, _ids(vocab=100))
    assert _fast_calls(record) == 14
    assert calls and set(calls) == {quant_type}


GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj: Conv1D


def gpt2_peft_model(seed=0, **lora_kwargs):
    """A small GPT-2 (transformers' Conv1D projections: weight [in, out]) under PEFT LoRA, which wraps
    Conv1D with fan_in_fan_out=True."""
    torch.manual_seed(seed)
    # no dropout in the model: PEFT's and the patched logits must agree
    cfg = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=32, vocab_size=100, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).float()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=GPT2_TARGETS, fan_in_fan_out=True,
                           init_lora_weights=False, **lora_kwargs)
    return peft.get_peft_model(model, lora)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpt2_conv1d_layers_run_fused_and_match_peft(backend, dora):
    reference = gpt2_peft_model(seed=4, use_dora=dora)
    layers = [m for m in reference.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(layers) == 8 and all(m.fan_in_fan_out for m in layers)
    assert all(isinstance(m.get_base_layer(), transformers.pytorch_utils.Conv1D) for m in layers)
    patched = copy.deepcopy(reference)
    report = lora_kernels.patch_peft_model(patched)
    assert report.swapped == {"lora.Linear": 8} and not report.left_on_peft
    x = torch.randn(5, 48)
    assert lk_peft.fallback_reason(patched.base_model.model.transformer.h[0].attn.c_attn, x) is None
    with use_backend(backend) as record:
        _compare_step(patched, reference, _ids(seed=5, seq=7))
    assert _fast_calls(record) == 8
    assert len(record.impls("bwd")) == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpt2_conv1d_layers_on_cuda_match_peft():
    # the transposed Conv1D weight through the GPU's routes (pointer GEMMs; TMA needs a unit inner stride)
    reference = gpt2_peft_model(seed=4).to("cuda", torch.bfloat16)
    patched = copy.deepcopy(reference)
    assert lora_kernels.patch_peft_model(patched).num_swapped == 8
    ids = _ids(seed=5, batch=4, seq=32).cuda()
    with use_backend("cuda") as record:
        out = patched(input_ids=ids, labels=ids)
        out.loss.backward()
    assert _fast_calls(record) == 8 and set(record.impls()) == {"triton"}
    ref = reference(input_ids=ids, labels=ids)
    ref.loss.backward()
    assert_close(out.logits, ref.logits, 2e-2, "bf16 logits")
    grads, ref_grads = _lora_grads(patched), _lora_grads(reference)
    assert grads.keys() == ref_grads.keys() and len(grads) == 16
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], 5e-2, name)


def test_gpt2_conv1d_layer_compiles_without_graph_breaks():
    # fullgraph on the layer: GPT-2's own forward breaks the graph in transformers' loss (a logger call)
    reference = gpt2_peft_model(seed=4)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    layer = patched.base_model.model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 5, 48, requires_grad=True)
    with use_backend("torch") as record:
        y = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
        y.sum().backward()
    assert record.impls("fwd") and record.impls("bwd")
    x_ref = x.detach().requires_grad_(True)
    ref = reference.base_model.model.transformer.h[0].attn.c_attn(x_ref)
    ref.sum().backward()
    assert_close(y, ref, BOUND, "y")
    assert_close(x.grad, x_ref.grad, BOUND, "dx")


def test_gpt2_conv1d_adamw_steps_match():
    reference = gpt2_peft_model(seed=6)
    patched = copy.deepcopy(reference)
    assert lora_kernels.patch_peft_model(patched).num_swapped == 8
    train_side_by_side((patched, reference), steps=3, lr=1e-2, rel_tol=BOUND, first_seed=20)


def train_side_by_side(models, steps: int, lr: float, rel_tol: float, first_seed: int, after_step=None,
                       make_optimizer=None):
    """AdamW steps (or ``make_optimizer(model, lr)``'s) on every model with the same batches; the losses
    must agree at every step. ``after_step(model, step)`` runs after each optimizer step (e.g.
    AdaLoRA's rank allocator)."""
    opts = [make_optimizer(m, lr) if make_optimizer else torch.optim.AdamW([p for p in m.parameters()
                                                                           if p.requires_grad], lr=lr)
            for m in models]
    for step in range(steps):
        ids = _ids(seed=first_seed + step)
        losses = []
        for model, opt in zip(models, opts):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(model, step)
            losses.append(loss.item())
        assert all(math.isclose(v, losses[-1], rel_tol=rel_tol) for v in losses), (step, losses)


@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "qlora"])
def test_adamw_steps_match(qlora):
    reference = peft_model(qlora=qlora, seed=3)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    train_side_by_side((patched, reference), steps=3, lr=1e-2, rel_tol=BOUND, first_seed=10)


def _lorafa_optimizer(model, lr):
    from peft.optimizers import create_lorafa_optimizer  # freezes lora_A, projects lora_B's gradient
    return create_lorafa_optimizer(model, r=8, lora_alpha=16, lr=lr)


def _riemannian_optimizer(model, lr):
    from peft.optimizers.riemannian import create_riemannian_optimizer  # preconditions A's and B's gradients
    return create_riemannian_optimizer(model, optimizer_cls=torch.optim.AdamW, lr=lr)


@pytest.mark.parametrize("make_optimizer", [
    _lorafa_optimizer,
    pytest.param(_riemannian_optimizer, marks=pytest.mark.skipif(
        importlib.util.find_spec("peft.optimizers.riemannian") is None, reason="came in PEFT 0.21"))],
    ids=["lorafa", "riemannian"])
def test_peft_s_optimizers_train_the_patched_model_as_peft(make_optimizer):
    """PEFT's LoRA-FA optimizer (lora_A frozen: the patched layers then keep only A x for backward)
    and Riemannian preconditioner read the adapters' values and gradients: same losses and adapters."""
    reference = peft_model(seed=3)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    with use_backend("torch") as record:
        train_side_by_side((patched, reference), steps=3, lr=1e-2, rel_tol=1e-6, first_seed=30,
                           make_optimizer=make_optimizer)
    assert _fast_calls(record) == 14 * 3
    for (name, p), ref in zip(patched.named_parameters(), reference.parameters()):
        if "lora_" in name:
            assert_close(p, ref, 1e-4, name)  # LoRA-FA's projection (A A^T)^-1 amplifies rounding: 7e-6


def test_training_with_dropout_uses_the_fast_path_and_a_seeded_mask():
    model = peft_model(dropout=0.1)
    lora_kernels.patch_peft_model(model)
    ids = _ids()
    with use_backend("torch") as record:
        torch.manual_seed(5)
        a = model(input_ids=ids).logits
        torch.manual_seed(5)
        b = model(input_ids=ids).logits
        torch.manual_seed(6)
        c = model(input_ids=ids).logits
    assert _fast_calls(record) == 42
    assert torch.equal(a, b) and not torch.equal(a, c)
    model.eval()  # dropout off: PEFT's numbers again
    reference = peft_model(dropout=0.1).eval()
    assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, BOUND, "eval logits")


@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "qlora"])
def test_greedy_generation_matches_peft(qlora):
    """generate() with the KV cache under torch.inference_mode (prefill, then one row per sequence
    and step): the patched model produces PEFT's tokens, every LoRA call on the fast path."""
    reference = peft_model(qlora=qlora).eval()
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    ids = _ids(batch=2, seq=5)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        want = reference.generate(input_ids=ids, **settings)
        with use_backend("torch") as record:
            got = patched.generate(input_ids=ids, **settings)
    assert got.shape == (2, 11) and torch.equal(got, want)
    assert _fast_calls(record) == 14 * 6  # 14 LoRA layers: prefill + 5 decoding steps


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "qlora"])
def test_gradient_checkpointing_recomputes_the_same_step(qlora, use_reentrant, dora):
    """transformers' gradient checkpointing (usual with QLoRA) runs every layer's forward again in
    backward: the recomputation draws the same dropout seed (checkpoint restores the RNG state), so
    loss and every LoRA gradient equal those of the step without checkpointing, bit for bit (DoRA's
    seeded_dropout and magnitude too)."""
    results = []
    for checkpointing in (False, True):
        model = peft_model(qlora=qlora, dropout=0.1, seed=4, use_dora=dora)
        lora_kernels.patch_peft_model(model)
        if checkpointing:
            # transformers 5.x renamed it (the old name warns, and goes in v6); older releases have the old only
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.enable_input_require_grads()  # the reentrant variant needs an input that requires grad
        model.train()
        ids = _ids()
        with use_backend("torch") as record:
            torch.manual_seed(11)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        results.append((loss.detach(), _lora_grads(model), _fast_calls(record)))
    (loss, grads, calls), (loss_ck, grads_ck, calls_ck) = results
    # QLoRA DoRA: the NF4 GEMM also gives W A^T (norm) and (x - d(x)) W^T (dropout)
    assert calls == 14 * (3 if dora and qlora else 1) and calls_ck == 2 * calls  # every forward ran again
    assert torch.equal(loss, loss_ck)
    assert grads.keys() == grads_ck.keys() and len(grads) == (42 if dora else 28)
    for name in grads:
        assert torch.equal(grads[name], grads_ck[name]), name


# ---------------------------------------------------------------------------------------------
# Fallbacks: whatever the fast path does not implement runs PEFT's forward
# ---------------------------------------------------------------------------------------------
def test_scaling_is_read_on_every_call():
    reference = peft_model(use_rslora=True)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    ids = _ids()
    for m in (patched, reference):
        for module in m.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                module.set_scale("default", 0.5)
    with use_backend("torch") as record:
        assert_close(patched(input_ids=ids).logits, reference(input_ids=ids).logits, BOUND, "set_scale")
    assert _fast_calls(record) == 14


def _hotswap_to_new_adapter(model, seed):
    """PEFT's hotswap of the "default" adapter for one of rank 4 with another alpha (written in place:
    the padded weights through .data, the tensor scaling with fill_)."""
    from peft.utils.hotswap import hotswap_adapter_from_state_dict
    cfg = peft.LoraConfig(r=4, lora_alpha=13, target_modules=TARGETS, init_lora_weights=False)
    other = peft.get_peft_model(tiny_llama(seed=seed), cfg)
    state = {k: v for k, v in other.state_dict().items() if "lora_" in k}  # ".default." in the names
    hotswap_adapter_from_state_dict(model, state, "default", cfg)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_compiled_hotswap_scaling_tensors_run_fused_and_follow_the_swap(compiled):
    """PEFT's prepare_model_for_compiled_hotswap makes each scaling a 0-d tensor (before: the fast path
    raised TypeError "scale must be a real number, got Tensor"); a hotswap writes it in place, and a
    compiled model must follow without recompiling."""
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap
    reference = peft_model(seed=3)
    prepare_model_for_compiled_hotswap(reference, target_rank=8)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    layer = patched.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.scaling["default"], torch.Tensor)
    assert lk_peft.fallback_reason(layer, torch.randn(2, 64)) is None
    torch._dynamo.reset()  # PeftModel.forward compiled by earlier tests counts toward the recompile limit
    run = torch.compile(patched, backend="aot_eager", fullgraph=True) if compiled else patched
    ids = _ids()
    with use_backend("torch") as record:
        out, ref = run(input_ids=ids, labels=ids), reference(input_ids=ids, labels=ids)
        out.loss.backward()
    ref.loss.backward()
    assert _fast_calls(record) == 14
    assert_close(out.logits, ref.logits, BOUND, "logits")
    grads, ref_grads = _lora_grads(patched), _lora_grads(reference)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert_close(grads[name], ref_grads[name], BOUND, name)
    for m in (run, reference):  # the compiled model itself, as PEFT's hotswap expects
        _hotswap_to_new_adapter(m, seed=5)
    assert layer.scaling["default"].item() == 13 / 4
    with torch._dynamo.config.patch(error_on_recompile=True), use_backend("torch") as record:
        assert_close(run(input_ids=ids, labels=ids).logits, reference(input_ids=ids).logits, BOUND, "after the hotswap")
    assert _fast_calls(record) == 14


def test_scaling_tensors_the_fast_path_does_not_take_fall_back():
    model = peft_model()
    lora_kernels.patch_peft_model(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.scaling["default"] = torch.full((64,), 2.0)
    assert lk_peft.fallback_reason(layer, torch.randn(2, 64)) == "a scaling tensor of shape [64]"
    layer.scaling["default"] = torch.tensor(2.0, requires_grad=True)  # PEFT gives it a gradient
    assert lk_peft.fallback_reason(layer, torch.randn(2, 64)) == "a scaling tensor that requires grad"
    with torch.no_grad():
        assert lk_peft.fallback_reason(layer, torch.randn(2, 64)) is None


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_models_made_under_inference_mode(dora):
    """Tensors made under torch.inference_mode (an inference server loading a model) have no version
    counter: DoRA's row-norm cache and the scaling tensors' cache raised "Inference tensors do not
    track version counter". An inference scaling tensor is folded into lora_B on every call, so a
    hotswap's write under inference_mode is followed."""
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap
    ids = _ids()
    with torch.inference_mode():
        reference = peft_model(use_dora=dora, seed=1)
        prepare_model_for_compiled_hotswap(reference, target_rank=8)
        patched = copy.deepcopy(reference)
        lora_kernels.patch_peft_model(patched)
        check_scaling_writes_are_followed(patched, reference, ids, 0.75)


def check_scaling_writes_are_followed(patched, reference, ids, value: float):
    """The patched model's logits equal PEFT's before and after ``fill_(value)`` of every layer's
    scaling tensor (as a hotswap writes it), every layer on the fast path."""
    for fill in (None, value):
        if fill is not None:
            for m in (patched, reference):
                for module in m.modules():
                    if isinstance(module, peft.tuners.lora.LoraLayer):
                        module.scaling["default"].fill_(fill)
        with torch.no_grad(), use_backend("torch") as record:
            assert_close(patched(input_ids=ids).logits, reference(input_ids=ids).logits, BOUND, f"scaling {fill}")
        assert _fast_calls(record) == 14


def test_a_scaling_tensor_folded_into_lora_B_is_not_rounded_to_its_dtype():
    """Folded (under torch.compile, or an inference tensor), the fp32 scale multiplies lora_B in
    fp32, as PEFT's fp32 scale multiplies its output: rounded to bf16 first, 16/3 became 5.34375."""
    model = peft_model()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    A, B = torch.randn(8, 64).bfloat16(), torch.randn(64, 8).bfloat16()
    with torch.inference_mode():
        layer.scaling["default"] = torch.tensor(16 / 3)
    _, folded_B, _, scale = lk_peft._adapter_tensors(layer, "default", A, B)
    assert scale == 1.0 and folded_B.dtype == torch.bfloat16
    assert torch.equal(folded_B, (B.float() * (16 / 3)).bfloat16())


def test_disabled_merged_and_mixed_batches_fall_back():
    reference = peft_model()
    reference.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    ids = _ids()
    for m in (patched, reference):
        m.eval()  # PEFT accepts adapter_names= only in eval mode

    def both(fn):
        with use_backend("torch") as record:
            out, ref = fn(patched), fn(reference)
        assert_close(out, ref, BOUND)
        return _fast_calls(record)

    def disabled(m):
        with m.disable_adapter():
            return m(input_ids=ids).logits
    assert both(disabled) == 0
    assert both(lambda m: m(input_ids=ids, adapter_names=["default", "other"]).logits) == 0
    for m in (patched, reference):
        m.base_model.set_adapter("other")
        m.merge_adapter()
    assert both(lambda m: m(input_ids=ids).logits) == 0  # merged
    for m in (patched, reference):
        m.unmerge_adapter()
    assert both(lambda m: m(input_ids=ids).logits) == 14  # back on the fast path, adapter "other"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "qlora"])
def test_several_active_adapters_run_as_one_fused_call(qlora, backend):
    """Two active adapters (PEFT's set_adapter([...]): the sum of their terms), of other ranks and
    scales, one with a lora_B bias: one fused call per layer with the adapters stacked along the rank,
    PEFT's logits and both adapters' gradients."""
    reference = peft_model(qlora=qlora)
    reference.add_adapter("other", peft.LoraConfig(r=3, lora_alpha=5, target_modules=TARGETS, lora_bias=True,
                                                   init_lora_weights=False))
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if "lora_B.other" in n and n.endswith(".bias"):  # PEFT starts b_B at zero
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    reference.base_model.set_adapter(["default", "other"])  # both active and trainable
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    layer = patched.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.active_adapters == ["default", "other"] and layer.scaling == {"default": 2.0, "other": 5 / 3}
    with use_backend(backend) as record:
        _compare_step(patched, reference, _ids())
    assert _fast_calls(record) == 14
    grads = _lora_grads(patched)
    assert len(grads) == 14 * 5  # A and B of each adapter, and the other's lora_B bias


def test_several_active_adapters_fall_back_where_one_call_would_differ():
    """Dropout in training (PEFT draws a mask per adapter) and DoRA among the adapters keep PEFT's path."""
    model = peft_model(dropout=0.1)
    model.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    model.add_adapter("dora", peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                                              init_lora_weights=False))
    lora_kernels.patch_peft_model(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    layer.set_adapter(["default", "other"])
    model.train()
    assert lk_peft.fallback_reason(layer, x) == "several active adapters with dropout in training"
    model.eval()  # dropout off: fast
    assert lk_peft.fallback_reason(layer, x) is None
    layer.set_adapter(["other", "dora"])
    assert lk_peft.fallback_reason(layer, x) == "several active adapters, one with DoRA"
    layer.set_adapter(["dora"])
    assert lk_peft.fallback_reason(layer, x) is None


def test_base_layer_hooks_and_own_forward_keep_peft_s_path():
    """PEFT calls base_layer(x): its hooks and a subclass's (or instance's) own forward run there,
    which the fast path, reading only the base layer's tensors, would skip."""
    reference = peft_model(seed=4)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    ids = _ids()

    def v_proj(m):
        return m.base_model.model.model.layers[0].self_attn.v_proj

    handles = [v_proj(m).base_layer.register_forward_hook(lambda mod, inp, out: 0.5 * out)
               for m in (patched, reference)]  # e.g. activation steering
    x = torch.randn(3, 64)
    assert lk_peft.fallback_reason(v_proj(patched), x) == "hooks on the base layer"
    with use_backend("torch") as record:
        assert_close(patched(input_ids=ids).logits, reference(input_ids=ids).logits, BOUND, "hook")
    assert _fast_calls(record) == 13
    for h in handles:
        h.remove()
    assert lk_peft.fallback_reason(v_proj(patched), x) is None
    global_hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda mod, inp: None)
    try:
        assert lk_peft.fallback_reason(v_proj(patched), x) == "hooks on the base layer"
    finally:
        global_hook.remove()

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    for m in (patched, reference):
        layer = v_proj(m)
        doubled = Doubled(64, 64, bias=False)
        doubled.weight = layer.base_layer.weight
        layer.base_layer = doubled
    assert lk_peft.fallback_reason(v_proj(patched), x) == "base layer Doubled with its own forward"
    with use_backend("torch") as record:
        assert_close(patched(input_ids=ids).logits, reference(input_ids=ids).logits, BOUND, "subclass")
    assert _fast_calls(record) == 13
    plain = torch.nn.Linear(64, 64, bias=False)
    plain.forward = lambda x: x  # an instance's own forward
    v_proj(patched).base_layer = plain
    assert lk_peft.fallback_reason(v_proj(patched), x) == "base layer Linear with its own forward"


def test_adapter_module_hooks_and_wrappers_keep_peft_s_path():
    """PEFT calls lora_A(x), lora_B(h) and DoRA's magnitude layer: their hooks run there (a user's, or
    FSDP2's fully_shard of them), and a wrapper in their place (FSDP1 under peft's auto-wrap policy)
    holds flat shards outside its forward. The fast path, reading their weights, skipped the hooks
    and read the shards (tests/integrations: the gloo runs)."""
    for use_dora in (False, True):
        reference = peft_model(seed=4, use_dora=use_dora)
        patched = copy.deepcopy(reference)
        lora_kernels.patch_peft_model(patched)
        x = torch.randn(3, 64)
        layers = [m.base_model.model.model.layers[0].self_attn.q_proj for m in (patched, reference)]
        handles = [lay.lora_B["default"].register_forward_hook(lambda mod, inp, out: 3 * out) for lay in layers]
        assert lk_peft.fallback_reason(layers[0], x).startswith("hooks on lora_B")
        with use_backend("torch") as record:
            assert_close(patched(input_ids=_ids()).logits, reference(input_ids=_ids()).logits, BOUND, "lora_B hook")
        assert _fast_calls(record) == 13
        for h in handles:
            h.remove()
        assert lk_peft.fallback_reason(layers[0], x) is None
        names = ("lora_A", "lora_magnitude_vector") if use_dora else ("lora_A",)
        for name in names:
            entries = getattr(layers[0], name)
            inner = entries["default"]

            class Wrapper(torch.nn.Module):  # holds the module, as FSDP1's wrapper does
                def __init__(self):
                    super().__init__()
                    self.wrapped = inner

                def forward(self, *args, **kwargs):
                    return self.wrapped(*args, **kwargs)

            entries["default"] = Wrapper()
            assert lk_peft.fallback_reason(layers[0], x) == (
                f"{name} is a Wrapper (e.g. FSDP1 wrapping the adapters, as peft's fsdp_auto_wrap_policy does: "
                "their weights are shards outside the wrapper's forward)")
            entries["default"] = inner
        assert lk_peft.fallback_reason(layers[0], x) is None
        layers[0].lora_A["default"].forward = lambda t: 2 * t  # an instance's own forward
        assert lk_peft.fallback_reason(layers[0], x) == "lora_A Linear with its own forward"
        del layers[0].lora_A["default"].forward
        assert lk_peft.fallback_reason(layers[0], x) is None


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_data_parallel_replicas_run_the_fast_path(monkeypatch, dora):
    """nn.DataParallel's replicas (torch.nn.parallel.replicate, its own code: parameters become plain
    tensor attributes of the replica modules, which share their original's __dict__ copies, caches
    included), emulated on a CPU: the broadcast to the GPUs replaced by copies, one replica's values
    scaled. Each replica's output is that of PEFT with its values (a DoRA replica took PEFT's path:
    its magnitude weight is not in _parameters)."""
    import sys
    replicate = sys.modules["torch.nn.parallel.replicate"]
    monkeypatch.setattr(replicate, "_broadcast_coalesced_reshape", lambda tensors, devices, detach=False: [
        [t.detach() * (1 + j) if isinstance(t, torch.nn.Parameter) and t.is_floating_point() else t.detach().clone()
         for t in tensors] for j in range(len(devices))])
    model = peft_model(use_dora=dora, seed=8)
    references = [copy.deepcopy(model) for _ in range(2)]
    with torch.no_grad():
        for p in references[1].parameters():
            p.mul_(2)
    lora_kernels.patch_peft_model(model)
    ids = _ids()
    with torch.no_grad():
        model(input_ids=ids)  # fills the layers' caches, which the replicas share
        replicas = replicate.replicate(model, [0, 1], detach=True)
        with use_backend("torch") as record:
            for replica, reference in zip(replicas, references):
                assert_close(replica(input_ids=ids).logits, reference(input_ids=ids).logits, BOUND, "replica")
    assert _fast_calls(record) == 28


def test_deepspeed_zero3_layers_keep_peft_s_path_with_a_reason_that_says_what_to_do():
    """DeepSpeed ZeRO-3 partitions the parameters (``ds_id``; an empty placeholder outside the forward
    of their module) and gathers them in hooks on each module: played here with those attributes and
    a hook (README: what a DeepSpeed run on a CPU gave)."""
    reference = peft_model(seed=4)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    layer = patched.base_model.model.model.layers[0].self_attn.v_proj
    x = torch.randn(3, 64)
    layer.base_layer.weight.ds_id = 7
    hook = layer.base_layer.register_forward_pre_hook(lambda mod, inp: None)  # DeepSpeed's gather
    assert lk_peft.fallback_reason(layer, x) == lk_peft.ZERO3_HOOKS_REASON
    assert "set_z3_leaf_modules" in lk_peft.ZERO3_HOOKS_REASON
    with use_backend("torch") as record:
        assert_close(patched(input_ids=_ids()).logits, reference(input_ids=_ids()).logits, BOUND, "ZeRO-3 hooks")
    assert _fast_calls(record) == 13
    hook.remove()
    assert lk_peft.fallback_reason(layer, x) is None  # leaf modules: gathered, no hooks on the base layer
    A = layer.lora_A["default"].weight
    gathered, A.data = A.data, torch.empty(0)  # partitioned, outside a forward of the layer
    A.ds_id = 8
    assert lk_peft.fallback_reason(layer, x) == lk_peft.ZERO3_PARTITIONED_REASON
    A.data = gathered
    del A.ds_id
    A.data = torch.empty(0, 64)  # not DeepSpeed's: an adapter of rank 0, as AdaLoRA prunes to
    assert lk_peft.fallback_reason(layer, x) == "adapter of rank 0"


@pytest.mark.parametrize("offload", [False, True])
def test_accelerate_device_hooks_keep_the_fast_path_unless_they_offload(offload):
    """A device_map over several GPUs makes accelerate wrap every layer's forward with an
    AlignDevicesHook that moves the inputs to the layer's device: a no-op for an input already there,
    so the fast path stays. A hook that loads offloaded weights must run: PEFT's path."""
    hooks = pytest.importorskip("accelerate.hooks")
    reference = peft_model(seed=4)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    layers = [m for m in patched.modules() if lk_peft.is_patched(m)]
    weights_map = None
    for layer in layers:
        if offload:  # the weights stay where they are; the hook "loads" them from this map
            weights_map = {n: t.detach() for n, t in layer.base_layer.named_parameters()}
        hooks.add_hook_to_module(layer.base_layer, hooks.AlignDevicesHook(
            execution_device="cpu", offload=offload, weights_map=weights_map, io_same_device=True))
        for adapter_module in (layer.lora_A["default"], layer.lora_B["default"]):  # these only align devices
            hooks.add_hook_to_module(adapter_module, hooks.AlignDevicesHook(execution_device="cpu"))
    ids = _ids()
    with use_backend("torch") as record:
        assert_close(patched(input_ids=ids).logits, reference(input_ids=ids).logits, BOUND, "hooked")
    assert _fast_calls(record) == (0 if offload else 14)
    for layer in layers:  # leaves the stock forward bound to the layer in its __dict__
        hooks.remove_hook_from_module(layer.base_layer)
    assert all("forward" in layer.base_layer.__dict__ for layer in layers)
    assert lk_peft.fallback_reason(layers[0], torch.randn(3, 64)) is None


def test_hooks_present_while_patching_only_defer_the_fast_path():
    """Hooks come and go: a layer whose base has one at patch time is still swapped (and LoRA-FA
    frozen); its calls take PEFT's path while the hook is there."""
    model = peft_model(seed=4)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    handle = q_proj.base_layer.register_forward_hook(lambda mod, inp, out: None)
    global_hook = torch.nn.modules.module.register_module_forward_hook(lambda mod, inp, out: None)
    try:
        report = lora_kernels.patch_peft_model(model, lora_fa=True)
        assert report.num_swapped == 14 and report.frozen_lora_A == 14 and not report.left_on_peft
        assert lk_peft.fallback_reason(q_proj, torch.randn(3, 64)) == "hooks on the base layer"
    finally:
        global_hook.remove()
    assert lk_peft.fallback_reason(q_proj, torch.randn(3, 64)) == "hooks on the base layer"
    handle.remove()
    assert lk_peft.fallback_reason(q_proj, torch.randn(3, 64)) is None


def test_lora_over_another_tuner_layer_keeps_peft_s_path():
    """A PeftMixedModel stacks a LoRA layer on a LoHa layer: the fast path would skip LoHa's term."""
    base = tiny_llama(seed=5)
    targets = ["q_proj", "v_proj"]
    reference = peft.get_peft_model(base, peft.LoHaConfig(r=4, alpha=8, target_modules=targets, init_weights=False),
                                    adapter_name="loha", mixed=True)
    reference.add_adapter("lora", peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    reference.set_adapter(["loha", "lora"])
    patched = copy.deepcopy(reference)
    report = lora_kernels.patch_peft_model(patched)
    assert report.num_swapped == 0 and len(report.left_on_peft) == 4
    assert all(why == "base layer peft.tuners.loha.layer.Linear" for why in report.left_on_peft.values())
    ids = _ids()
    assert_close(patched(input_ids=ids).logits, reference(input_ids=ids).logits, BOUND, "LoHa + LoRA")


def _linear4bit_modules(model):
    import bitsandbytes as bnb
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_qlora_eval_calls_on_peft_s_path_leave_the_weight_to_the_fast_path():
    """bitsandbytes repacks a Linear4bit's weight for its CPU kernel, for good, in its own forward in
    eval mode without grad (on a CPU with AVX512-BF16). In a patched model that forward runs for calls
    on PEFT's path (here disable_adapter()): the layers then stayed on PEFT's path, whose training
    forward on the repacked weight drops gradients. Patching turns the repacking off; unpatching
    restores it."""
    bnb = pytest.importorskip("bitsandbytes")
    if not bnb.functional.has_avx512bf16():
        pytest.skip("bitsandbytes repacks only on a CPU with AVX512-BF16")
    reference = peft_model(qlora=True, seed=6)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    ids = _ids()
    patched.eval()
    with torch.no_grad(), patched.disable_adapter():
        patched(input_ids=ids)  # bitsandbytes' own forward of every Linear4bit
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in _linear4bit_modules(patched))
    patched.train()
    with use_backend("torch") as record:
        _compare_step(patched, reference, ids)
    assert _fast_calls(record) == 14
    lora_kernels.unpatch_peft_model(patched)
    assert all(m.support_avx512bf16_for_cpu and not any(k.startswith("_lora_kernels") for k in vars(m))
               for m in _linear4bit_modules(patched))
    # merge_and_unload() and unload() hand the Linear4bit layers back as they were before patching
    for unload in ("merge_and_unload", "unload"):
        model = copy.deepcopy(reference)
        lora_kernels.patch_peft_model(model)
        assert not any(m.support_avx512bf16_for_cpu for m in _linear4bit_modules(model))
        base = getattr(model, unload)()
        assert len(_linear4bit_modules(base)) == 14
        assert all(m.support_avx512bf16_for_cpu and not any(k.startswith("_lora_kernels") for k in vars(m))
                   for m in _linear4bit_modules(base)), unload


def test_lora_dropout_one_runs_in_eval_and_falls_back_in_training():
    """nn.Dropout(p=1) zeros the LoRA input: PEFT's path in training (the kernels take p < 1), the
    fast path (no dropout) in eval."""
    reference = peft_model(dropout=1.0)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    layer = patched.base_model.model.model.layers[0].self_attn.q_proj
    ids, x = _ids(), torch.randn(3, 64)
    for m in (patched, reference):
        m.train()
    assert lk_peft.fallback_reason(layer, x) == "lora_dropout p = 1 in training"
    assert_close(patched(input_ids=ids).logits, reference(input_ids=ids).logits, BOUND, "train")
    for m in (patched, reference):
        m.eval()
    with use_backend("torch") as record:
        assert_close(patched(input_ids=ids).logits, reference(input_ids=ids).logits, BOUND, "eval")
    assert _fast_calls(record) == 14


def test_fallback_reason_names_the_cause():
    model = peft_model()
    lora_kernels.patch_peft_model(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    assert lk_peft.fallback_reason(layer, x) is None
    assert "dtype" in lk_peft.fallback_reason(layer, x.double())
    assert "extra" in lk_peft.fallback_reason(layer, x, kwargs={"adapter_names": ["default"] * 3})
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fast under autocast too, even with fp64 weights
        assert lk_peft.fallback_reason(layer, x) is None
        layer.base_layer.weight.data = layer.base_layer.weight.data.double()
        assert lk_peft.fallback_reason(layer, x) is None
    assert "dtype" in lk_peft.fallback_reason(layer, x)
    layer.base_layer.weight.data = layer.base_layer.weight.data.float()
    layer.base_layer.weight.requires_grad_(True)
    assert "trainable" in lk_peft.fallback_reason(layer, x)


def test_fallback_reason_of_layers_patch_peft_model_did_not_swap():
    """A layer left on PEFT (a LoRA Embedding) or never patched runs PEFT's forward on every call: the
    reason says so (before: None, "fast path", for an unpatched lora.Linear, and "no active adapter"
    for a lora.Embedding, whose adapters are in lora_embedding_A)."""
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    unpatched = model.base_model.model.model.layers[0].self_attn.q_proj
    assert "not patched by lora_kernels" in lk_peft.fallback_reason(unpatched, torch.randn(3, 64))
    report = lora_kernels.patch_peft_model(model)
    assert list(report.left_on_peft) == ["base_model.model.model.embed_tokens"]
    embedding = model.base_model.model.model.embed_tokens
    assert lk_peft.fallback_reason(embedding, _ids()) == (
        "peft.tuners.lora.layer.Embedding is not patched by lora_kernels (patch_peft_model's report lists the "
        "layers it left on PEFT and why)")
    assert lk_peft.fallback_reason(unpatched, torch.randn(3, 64)) is None


def test_threads_unpickling_patched_models_at_once_share_one_class(monkeypatch):
    """In a process that has not patched anything, unpickling a patched model builds its layer class
    (module __getattr__): threads doing so at once each built one, and the layers of all but one
    class were then not patched (unpatch_peft_model raised "no layers patched")."""
    import pickle
    import sys
    import threading
    model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 16)), peft.LoraConfig(r=4, target_modules=["0"]))
    lora_kernels.patch_peft_model(model)
    blob = pickle.dumps(model)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the race shows in most trials without the fix
    try:
        for _ in range(20):
            monkeypatch.setattr(lk_peft, "_FAST_CLASSES", {})  # as in a fresh process
            monkeypatch.delitem(vars(lk_peft), "LoRAKernelsLinear", raising=False)
            loaded, barrier = [None] * 4, threading.Barrier(4)

            def load(i):
                barrier.wait()
                loaded[i] = pickle.loads(blob)
            threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len({type(m.base_model.model[0]) for m in loaded}) == 1
            assert all(lk_peft.is_patched(m.base_model.model[0]) for m in loaded)
    finally:
        sys.setswitchinterval(interval)


@pytest.mark.parametrize("use_dora", [False, True])
def test_build_peft_layer_takes_every_setting_of_the_config(use_dora):
    """lk_peft.build_peft_layer (the benchmarks' and tests' PEFT reference layer) builds what
    get_peft_model builds for that config on the installed PEFT: the config's dropout, rsLoRA scale,
    lora_bias and DoRA, none silently dropped (PEFT < 0.19 ignores a config= keyword)."""
    from peft.tuners.lora.layer import Linear as PeftLinear
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25, use_rslora=True, lora_bias=not use_dora,
                          use_dora=use_dora, target_modules=["lin"])
    torch.manual_seed(0)
    built = lk_peft.build_peft_layer(PeftLinear, torch.nn.Linear(12, 10), cfg, r=4, lora_alpha=8)
    wrapped = peft.get_peft_model(torch.nn.Sequential(collections.OrderedDict(lin=torch.nn.Linear(12, 10))), cfg)
    for layer in (built, wrapped.base_model.model.lin):
        assert type(layer) is PeftLinear
        assert layer.lora_dropout["default"].p == 0.25 and layer.scaling["default"] == 8 / math.sqrt(4)
        assert (layer.lora_B["default"].bias is not None) == (not use_dora)
        assert ("default" in layer.lora_magnitude_vector) == use_dora


@pytest.mark.skipif(not hasattr(peft.LoraConfig(), "alora_invocation_tokens"), reason="aLoRA came in PEFT 0.18")
def test_other_lora_variants_are_left_on_peft():
    reference = peft_model(alora_invocation_tokens=[3])  # activated LoRA (aLoRA)
    patched = copy.deepcopy(reference)
    report = lora_kernels.patch_peft_model(patched)
    assert report.swapped == {} and len(report.left_on_peft) == 14
    assert set(report.left_on_peft.values()) == {"LoRA variant ALoraLinearVariant"}
    assert "left on PEFT" in str(report)
    ids = _ids()
    assert torch.equal(patched(input_ids=ids).logits, reference(input_ids=ids).logits)


# ---------------------------------------------------------------------------------------------
# DoRA: y = g (x W^T + s x A^T B^T) + bias, g = magnitude / ||W + s B A||_row (detached)
# ---------------------------------------------------------------------------------------------
def _magnitude_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if "lora_magnitude_vector" in n}


@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "qlora"])
def test_dora_matches_peft_on_the_fast_path(qlora):
    reference = peft_model(seed=3, qlora=qlora, use_dora=True)
    patched = copy.deepcopy(reference)
    report = lora_kernels.patch_peft_model(patched)
    assert report.num_swapped == 14 and not report.left_on_peft
    ids = _ids()
    with use_backend("torch") as record:
        _compare_step(patched, reference, ids)  # logits; lora_A, lora_B and magnitude gradients
    assert _fast_calls(record) == 14 + 14 * qlora  # QLoRA: W A^T for the norm runs on the NF4 GEMM too
    assert len(_magnitude_grads(patched)) == 14
    assert all(g.abs().sum() > 0 for g in _magnitude_grads(patched).values())


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "qlora"])
def test_unbatched_input_gives_peft_s_shape(qlora, dora):
    """A 1-D x [K]: plain LoRA gives [N] as nn.Linear; PEFT's DoRA gives [1, N] (its magnitude scale
    is a [1, N] row): the patched layer gives PEFT's shape and values, on the fast path."""
    reference = peft_model(seed=3, qlora=qlora, use_dora=dora)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(4))  # PEFT's zero B hides the LoRA term
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    layer = patched.base_model.model.model.layers[0].self_attn.q_proj
    ref_layer = reference.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(layer.in_features, generator=torch.Generator().manual_seed(5))
    assert lk_peft.fallback_reason(layer, x) is None
    y, ref_y = layer(x), ref_layer(x)
    assert y.shape == ref_y.shape == ((1, layer.out_features) if dora else (layer.out_features,))
    assert_close(y, ref_y, BOUND, "unbatched")


def test_dora_row_norms_of_the_base_are_cached_until_it_changes():
    CPU = torch.device("cpu")  # the cache holds an entry per device (row_sqnorm)
    model = peft_model(seed=3, use_dora=True)
    lora_kernels.patch_peft_model(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    ids = _ids()
    model(input_ids=ids)
    cached = layer.base_layer.__dict__[lk_peft._ROW_SQNORM_CACHE][CPU][1]
    model(input_ids=ids)
    assert layer.base_layer.__dict__[lk_peft._ROW_SQNORM_CACHE][CPU][1] is cached  # not recomputed
    with torch.no_grad():
        layer.base_layer.weight.mul_(2)  # in place: the version counter moves
    reference = copy.deepcopy(model)
    lora_kernels.unpatch_peft_model(reference)
    assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, BOUND, "after an in-place change")
    assert_close(layer.base_layer.__dict__[lk_peft._ROW_SQNORM_CACHE][CPU][1], 4 * cached, 1e-6, "recomputed")


def test_dora_with_dropout_matches_peft_s_formula_in_float64():
    # PEFT's DoRA with dropout d: y = W x + b + (g - 1) W d(x) + g s B A d(x), g = m / ||W + s B A||
    # (detached). The mask is lora_kernels' (regenerated from its seed), so the float64 reference
    # applies the same keep mask.
    from tests.helpers import keep_mask_for

    model = peft_model(seed=5, use_dora=True, dropout=0.3)
    lora_kernels.patch_peft_model(model)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    assert lk_peft.fallback_reason(layer, torch.ones(1, layer.in_features)) is None
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    torch.manual_seed(11)
    y = layer(x)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    y.backward(grad_y)
    params = {"x": x, "lora_A": layer.lora_A["default"].weight, "lora_B": layer.lora_B["default"].weight,
              "magnitude": layer.lora_magnitude_vector["default"].weight}
    ref = {k: v.detach().double().requires_grad_(True) for k, v in params.items()}
    W, b, s = layer.base_layer.weight.double(), layer.base_layer.bias, layer.scaling["default"]
    keep = keep_mask_for(11, 10, layer.in_features, 0.3).view(x.shape)
    d = ref["x"] * keep / 0.7
    norm = torch.linalg.norm(W + s * ref["lora_B"].detach() @ ref["lora_A"].detach(), dim=1)
    g = ref["magnitude"] / norm
    y64 = ref["x"] @ W.t() + (g - 1) * (d @ W.t()) + g * s * (d @ ref["lora_A"].t() @ ref["lora_B"].t())
    if b is not None:
        y64 = y64 + b.double()
    assert_close(y, y64, BOUND, "y")
    y64.backward(grad_y.double())
    for name in params:
        assert params[name].grad.abs().sum() > 0
        assert_close(params[name].grad, ref[name].grad, BOUND, f"d{name}")


def test_dora_with_dropout_training_step_keeps_no_mask():
    reference = peft_model(seed=5, use_dora=True, dropout=0.1)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    ids = _ids(batch=4, seq=32)
    with use_backend("torch") as record:
        out = patched(input_ids=ids, labels=ids)
        out.loss.backward()
    assert _fast_calls(record) == 14
    assert all(g.abs().sum() > 0 for g in _lora_grads(patched).values())
    # PEFT keeps nn.Dropout's mask, the dropped copy, base and LoRA results; the patched layers a seed
    assert _saved_bytes(patched, ids) < 0.75 * _saved_bytes(reference, ids)
    patched.eval()
    reference.eval()
    assert_close(patched(input_ids=ids).logits, reference(input_ids=ids).logits, BOUND, "eval logits")


def test_dora_saves_less_than_peft_for_backward():
    # PEFT's DoRA keeps base_result and lora_result ([M, N] each) besides x; the fused path keeps
    # the fused output (for the magnitude gradient), x and h
    reference = peft_model(seed=6, use_dora=True)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    ids = _ids(batch=4, seq=32)
    ours, theirs = _saved_bytes(patched, ids), _saved_bytes(reference, ids)
    assert ours < 0.75 * theirs, (ours, theirs)


@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "qlora"])
def test_dora_autocast_training_step_matches_peft(qlora):
    reference = peft_model(seed=7, use_dora=True, qlora=qlora)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    layer, ref_layer = (m.base_model.model.model.layers[0].self_attn.q_proj for m in (patched, reference))
    for x_dtype in (torch.float32, torch.bfloat16):  # one layer: PEFT's output dtype (bnb: x's) and values
        x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(2)).to(x_dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert lk_peft.fallback_reason(layer, x) is None
            y, y_ref = layer(x), ref_layer(x)
        assert y.dtype == y_ref.dtype, (x_dtype, y.dtype, y_ref.dtype)
        assert_close(y.float(), y_ref.float(), 1e-2, f"layer output, x {x_dtype}")
    ids = _ids()
    outs = []
    for model in (patched, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append(out)
    assert_close(outs[0].logits.float(), outs[1].logits.float(), 2e-2, "logits")
    grads, ref_grads = _lora_grads(patched), _lora_grads(reference)
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], 5e-2, name)


@needs_dynamo_through_transformers_5
def test_dora_torch_compile_fullgraph_training_step():
    ids = _ids()
    eager = peft_model(seed=4, use_dora=True)
    lora_kernels.patch_peft_model(eager)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)  # any graph break raises
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    ref = eager(input_ids=ids, labels=ids)
    ref.loss.backward()
    assert math.isclose(out.loss.item(), ref.loss.item(), rel_tol=BOUND)
    grads, ref_grads = _lora_grads(compiled_model), _lora_grads(eager)
    assert len(_magnitude_grads(compiled_model)) == 14
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], BOUND, name)
    # with dropout (seeded_dropout and the second base GEMM inside the graph): trains end to end
    dropped = peft_model(dropout=0.1, seed=4, use_dora=True)
    lora_kernels.patch_peft_model(dropped)
    loss = torch.compile(dropped, backend="aot_eager", fullgraph=True)(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(g.abs().sum() > 0 for g in _lora_grads(dropped).values())


def test_dora_save_pretrained_and_merge_are_peft_s():
    reference = peft_model(seed=8, use_dora=True)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    ids = _ids()
    expected = reference(input_ids=ids).logits
    merged = patched.merge_and_unload()
    assert_close(merged(input_ids=ids).logits, expected, BOUND, "merged")


# ---------------------------------------------------------------------------------------------
# Checkpoints, merge, unpatch, bad use
# ---------------------------------------------------------------------------------------------
def test_save_pretrained_and_reload(tmp_path):
    reference = peft_model(seed=7)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    patched.save_pretrained(tmp_path / "patched")
    reference.save_pretrained(tmp_path / "reference")
    from safetensors.torch import load_file
    saved, ref_saved = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("patched", "reference"))
    assert saved.keys() == ref_saved.keys() and len(saved) == 28
    for k in saved:
        assert torch.equal(saved[k], ref_saved[k]) and saved[k].abs().sum() > 0, k
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(seed=7), tmp_path / "patched")
    ids = _ids()
    assert torch.equal(reloaded(input_ids=ids).logits, reference(input_ids=ids).logits)


_LOAD_IN_FRESH_PROCESS = """
import sys, torch
from lora_kernels.integrations import peft as lk_peft
model = torch.load(sys.argv[1], weights_only=False)  # nothing patched in this process before
ids = torch.load(sys.argv[2])
layers = [m for m in model.modules() if lk_peft.is_patched(m)]
assert len(layers) == 14, len(layers)
assert all(lk_peft.fallback_reason(m, torch.ones(1, m.in_features)) is None for m in layers)
torch.save(model(input_ids=ids).logits, sys.argv[3])
"""


@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "qlora"])
def test_whole_model_pickle_loads_in_a_fresh_process(tmp_path, qlora):
    # torch.save(model) pickles the layers' classes by name; a process that never called
    # patch_peft_model must still find them (it did not: AttributeError 'LoRAKernelsLinear').
    import subprocess
    import sys

    reference = peft_model(seed=9, qlora=qlora)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    ids = _ids(vocab=100)
    torch.save(patched, tmp_path / "model.pt")
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, str(tmp_path / "model.pt"),
                          str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert_close(torch.load(tmp_path / "logits.pt"), reference(input_ids=ids).logits, BOUND, "logits")


def _per_sample_grads(model, ids):
    """Per-sample LoRA gradients with torch.func (vmap(grad(functional_call))), as DP-SGD takes them."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss(p, row):
        return functional_call(model, p, (), {"input_ids": row[None], "labels": row[None]}).loss
    return vmap(grad(loss), in_dims=(None, 0), randomness="same")(params, ids)


@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "qlora"])
def test_per_sample_gradients_with_torch_func(qlora):
    # Dense: equal to PEFT's. QLoRA: PEFT + bitsandbytes itself fails under torch.func (bnb's
    # autograd function has no setup_context), so against our eager per-sample backward instead.
    reference = peft_model(seed=2, qlora=qlora)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    ids = _ids(batch=3, seq=6)
    got = _per_sample_grads(patched, ids)
    assert len(got) == 28
    if not qlora:
        expected = _per_sample_grads(reference, ids)
        for name in got:
            assert_close(got[name], expected[name], BOUND, name)
        return
    for i in range(ids.shape[0]):
        patched.zero_grad()
        patched(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss.backward()
        for name, p in patched.named_parameters():
            if p.requires_grad:
                assert p.grad.abs().sum() > 0
                assert_close(got[name][i], p.grad, BOUND, name)


@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "qlora"])
def test_merge_and_unload(qlora):
    reference = peft_model(seed=8, qlora=qlora)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    ids = _ids()
    expected = reference(input_ids=ids).logits
    assert_close(patched(input_ids=ids).logits, expected, BOUND, "patched")
    assert sum(lk_peft._NF4_CACHE in m.__dict__ for m in patched.modules()) == 14 * qlora
    merged = patched.merge_and_unload()
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
    # the cached NF4 view of the weight before the merge would keep that weight alive
    assert not any(lk_peft._NF4_CACHE in m.__dict__ for m in merged.modules())
    ref_merged = reference.merge_and_unload()
    assert_close(merged(input_ids=ids).logits, ref_merged(input_ids=ids).logits, BOUND, "merged")
    if not qlora:  # (QLoRA: the merged weight is re-quantized)
        assert_close(merged(input_ids=ids).logits, expected, BOUND, "merged")


def test_unpatch_restores_peft_exactly():
    model = peft_model()
    ids = _ids()
    expected = model(input_ids=ids).logits
    report = lora_kernels.patch_peft_model(model, lora_fa=True)
    assert report.frozen_lora_A == 14
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    assert lora_kernels.unpatch_peft_model(model) == 14
    assert all(type(m) is peft.tuners.lora.Linear for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert not any(hasattr(m, lk_peft._ORIGINAL_CLASS) for m in model.modules())
    assert torch.equal(model(input_ids=ids).logits, expected)


def test_lora_fa_survives_set_adapter_and_add_adapter():
    """PEFT's set_adapter (add_adapter runs it too) makes the active adapters trainable: LoRA-FA's
    lora_A stays frozen, for new adapters too, and unpatch restores PEFT's flags."""
    model = peft_model()
    lora_kernels.patch_peft_model(model, lora_fa=True)

    def trainable(adapter):
        return {n.rsplit(".", 2)[0].rsplit(".", 1)[-1]: p.requires_grad for n, p in model.named_parameters()
                if f".{adapter}." in n and ("lora_A" in n or "lora_B" in n)}

    model.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    model.base_model.set_adapter("other")
    assert trainable("other") == {"lora_A": False, "lora_B": True}
    model.base_model.set_adapter("default")
    assert trainable("default") == {"lora_A": False, "lora_B": True}
    lora_kernels.unpatch_peft_model(model)
    assert trainable("default") == {"lora_A": True, "lora_B": True}
    assert trainable("other") == {"lora_A": False, "lora_B": False}  # PEFT's: an inactive adapter is frozen


def test_unpatch_restores_the_flags_of_the_last_set_adapter():
    """An adapter inactive while patching (frozen by PEFT) and activated later: after unpatch its
    lora_A is trainable, as in a PEFT model that never was patched."""
    model, twin = peft_model(), peft_model()
    for m in (model, twin):
        m.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    lora_kernels.patch_peft_model(model, lora_fa=True)
    for m in (model, twin):
        m.base_model.set_adapter(["default", "other"])
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    lora_kernels.unpatch_peft_model(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags == {n: p.requires_grad for n, p in twin.named_parameters()}
    assert all(flags[n] for n in flags if ".other." in n)


@pytest.mark.skipif(not hasattr(peft.PeftModel, "set_requires_grad"), reason="set_requires_grad came in PEFT 0.18")
def test_lora_fa_survives_set_requires_grad_and_load_adapter(tmp_path):
    """PEFT's set_requires_grad (load_adapter(is_trainable=True) runs it, not set_adapter) makes the
    adapter's weights trainable: lora_A stays frozen, and unpatch restores what PEFT set."""
    model, twin = peft_model(), peft_model()
    model.save_pretrained(tmp_path / "saved")
    lora_kernels.patch_peft_model(model, lora_fa=True)
    for m in (model, twin):
        m.load_adapter(tmp_path / "saved", adapter_name="loaded", is_trainable=True)
        m.set_requires_grad("default")
    assert [n for n, p in model.named_parameters() if "lora_A" in n and p.requires_grad] == []
    assert any(p.requires_grad for n, p in twin.named_parameters() if "lora_A" in n)  # PEFT itself unfroze them
    lora_kernels.unpatch_peft_model(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == \
        {n: p.requires_grad for n, p in twin.named_parameters()}


def test_patching_again_swaps_the_layers_peft_added():
    """add_adapter on new target modules makes new PEFT layers: a second patch_peft_model call (same
    lora_fa) swaps them and freezes their lora_A; another lora_fa, or nothing new, is an error."""
    model = peft_model()
    first = lora_kernels.patch_peft_model(model, lora_fa=True)
    model.add_adapter("more", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    model.base_model.set_adapter("more")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert sum(lk_peft.is_patched(m) for m in layers.values()) == first.num_swapped == len(layers) - 1 == 14
    with pytest.raises(ValueError, match="lora_fa=True"):
        lora_kernels.patch_peft_model(model)
    second = lora_kernels.patch_peft_model(model, lora_fa=True)
    assert second.num_swapped == 1 and second.frozen_lora_A == 1  # lm_head's adapter "more"
    assert all(lk_peft.is_patched(m) for m in layers.values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    with pytest.raises(ValueError, match="no new layer"):
        lora_kernels.patch_peft_model(model, lora_fa=True)
    # a new layer the patch does not take (an embedding) is reported, not an error
    model.add_adapter("emb", peft.LoraConfig(r=4, target_modules=["embed_tokens"]))
    third = lora_kernels.patch_peft_model(model, lora_fa=True)
    assert third.num_swapped == 0 and list(third.left_on_peft) == ["base_model.model.model.embed_tokens"]


def test_qlora_bias_cast_in_place_as_bitsandbytes_does():
    """bnb's Linear4bit.forward casts its bias parameter, in place, to the dtype it computes in: PEFT's
    model then saves and trains the bias in that dtype, and so must a patched one."""
    bnb = pytest.importorskip("bitsandbytes")

    def model(compute_dtype, dtype):
        torch.manual_seed(0)
        m = torch.nn.Module()
        m.q_proj = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=compute_dtype, quant_type="nf4")
        m.q_proj.weight = bnb.nn.Params4bit(torch.randn(32, 64, dtype=dtype), requires_grad=False,
                                            quant_type="nf4", module=m.q_proj)
        m.q_proj = m.q_proj.to(dtype=dtype).to("cpu")
        m.q_proj.bias.data = torch.randn(32, dtype=torch.float16)
        m.is_loaded_in_4bit = True
        m.forward = lambda x: m.q_proj(x)
        # init_lora_weights=False: a random lora_B, so y carries the LoRA term (PEFT's zero B would hide it)
        return peft.get_peft_model(m, peft.LoraConfig(r=4, target_modules=["q_proj"], bias="lora_only",
                                                      init_lora_weights=False))

    # an fp16 model with bnb's default fp32 compute dtype; an fp32 one without (the first x sets it)
    for compute_dtype, x_dtype in ((torch.float32, torch.float16), (None, torch.float32)):
        ref, patched = model(compute_dtype, x_dtype), model(compute_dtype, x_dtype)
        assert lora_kernels.patch_peft_model(patched).num_swapped == 1
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).to(x_dtype)
        outs = [m(x) for m in (ref, patched)]
        assert_close(outs[1], outs[0].double(), BOUND if x_dtype == torch.float32 else 2e-3, "y")
        ref_bias, bias = (m.base_model.model.q_proj.base_layer.bias for m in (ref, patched))
        assert ref_bias.dtype != torch.float16  # bnb changed it
        assert bias.dtype == ref_bias.dtype and torch.equal(bias, ref_bias)


def test_bad_use_gives_clear_errors():
    model = peft_model()
    lora_kernels.patch_peft_model(model)
    with pytest.raises(ValueError, match="already patched"):
        lora_kernels.patch_peft_model(model)
    lora_kernels.unpatch_peft_model(model)
    with pytest.raises(ValueError, match="no layers patched"):
        lora_kernels.unpatch_peft_model(model)
    with pytest.raises(ValueError, match="no PEFT LoRA layers"):
        lora_kernels.patch_peft_model(tiny_llama())
    with pytest.raises(TypeError, match="model"):
        lora_kernels.patch_peft_model("not a model")
    with pytest.raises(TypeError, match="lora_fa"):
        lora_kernels.patch_peft_model(model, lora_fa="yes")


def test_unsupported_lora_layers_are_reported():
    model = tiny_llama()
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    report = lora_kernels.patch_peft_model(pm)
    assert report.swapped == {"lora.Linear": 2}
    assert list(report.left_on_peft) == ["base_model.model.model.embed_tokens"]
    assert "Embedding" in report.left_on_peft["base_model.model.model.embed_tokens"]


# ---------------------------------------------------------------------------------------------
# LoRA-FA and memory
# ---------------------------------------------------------------------------------------------
def _saved_bytes(model, ids) -> int:
    """Unique non-parameter storages autograd saves in one training forward (bytes)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum()
    return sum(storages.values())


def _facts_model(dropout, seed=0):
    """FACTS.md's memory model: h512, 2 layers, r=16 alpha=32 on all seven projections, fp32."""
    model = tiny_llama(hidden=512, intermediate=1408, layers=2, vocab=1000, seed=seed)
    cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=dropout)
    return peft.get_peft_model(model, cfg).train()


def test_saved_activation_memory_against_peft():
    ids = _ids(batch=4, seq=256, vocab=1000)
    mib = 2 ** 20
    peft_bytes = _saved_bytes(_facts_model(0.1), ids)
    assert 120 * mib < peft_bytes < 132 * mib  # FACTS.md: 126.0 MiB
    patched = {}
    for dropout, lora_fa in ((0.0, False), (0.1, False), (0.1, True)):
        model = _facts_model(dropout)
        lora_kernels.patch_peft_model(model, lora_fa=lora_fa)
        patched[dropout, lora_fa] = _saved_bytes(model, ids)
    # Dropout costs one 8-byte seed per layer (14 layers), never a mask or a dropped copy of x.
    assert patched[0.1, False] - patched[0.0, False] == 14 * 8
    assert patched[0.1, False] <= 0.65 * peft_bytes
    assert patched[0.1, True] <= 0.50 * peft_bytes


# ---------------------------------------------------------------------------------------------
# torch.compile and distributed training
# ---------------------------------------------------------------------------------------------
def _check_compiled_step_matches_eager(eager):
    """A fullgraph compile (any graph break raises) of the patched model ``eager``: every layer on the
    fast path, eager's loss and LoRA gradients."""
    ids = _ids()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    with use_backend("torch") as record:
        out = compiled(input_ids=ids, labels=ids)
        out.loss.backward()
    assert _fast_calls(record) == 14 and len(record.impls("bwd")) == 14
    ref = eager(input_ids=ids, labels=ids)
    ref.loss.backward()
    assert math.isclose(out.loss.item(), ref.loss.item(), rel_tol=BOUND)
    grads, ref_grads = _lora_grads(compiled_model), _lora_grads(eager)
    assert grads.keys() == ref_grads.keys() and grads
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], BOUND, name)


@needs_dynamo_through_transformers_5
def test_torch_compile_fullgraph_training_step():
    ids = _ids()
    eager = peft_model(seed=4)
    lora_kernels.patch_peft_model(eager)
    _check_compiled_step_matches_eager(eager)
    # with dropout: the seed is drawn inside the graph, training still runs end to end
    dropped = peft_model(dropout=0.1, seed=4)
    lora_kernels.patch_peft_model(dropped)
    loss = torch.compile(dropped, backend="aot_eager", fullgraph=True)(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(g.abs().sum() > 0 for g in _lora_grads(dropped).values())


@needs_dynamo_through_transformers_5
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_torch_compile_fullgraph_qlora_training_step(quant_type):
    """A patched QLoRA model (bnb Linear4bit, NF4 or FP4) compiles without graph breaks and gives
    eager's loss and gradients."""
    eager = peft_model(qlora=True, quant_type=quant_type, seed=4)
    lora_kernels.patch_peft_model(eager)
    _check_compiled_step_matches_eager(eager)



@needs_dynamo_through_transformers_5
@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "qlora"])
def test_torch_compile_dynamic_shapes_take_new_lengths_without_recompiling(qlora):
    """Compiled with symbolic shapes (dynamic=True, what torch.compile switches to after a second
    sequence length), a patched model runs batches of other sizes and lengths on the same graph: the
    ops' fake implementations keep M symbolic (a recompile raises here), every layer stays on the fast
    path, and each step gives eager's loss and LoRA gradients, dropout masks included (same seed)."""
    dropout = 0.0 if qlora else 0.1
    eager = peft_model(qlora=qlora, dropout=dropout, seed=4)
    lora_kernels.patch_peft_model(eager)
    compiled_model = copy.deepcopy(eager)
    torch._dynamo.reset()  # PeftModel.forward compiled by earlier tests counts toward the recompile limit
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True, dynamic=True)
    # batch >= 2 throughout: dynamo specializes sizes 0 and 1 whatever the model does
    for step, (batch, seq) in enumerate([(2, 9), (2, 5), (3, 12), (4, 7)]):
        ids = _ids(seed=seq, batch=batch, seq=seq)
        with torch._dynamo.config.patch(error_on_recompile=step > 0), use_backend("torch") as record:
            torch.manual_seed(seq)
            out = compiled(input_ids=ids, labels=ids)
            out.loss.backward()
        assert _fast_calls(record) == 14 and len(record.impls("bwd")) == 14
        torch.manual_seed(seq)
        ref = eager(input_ids=ids, labels=ids)
        ref.loss.backward()
        assert math.isclose(out.loss.item(), ref.loss.item(), rel_tol=BOUND)
        grads, ref_grads = _lora_grads(compiled_model), _lora_grads(eager)
        assert grads.keys() == ref_grads.keys() and len(grads) == 28
        for name in ref_grads:
            assert_close(grads[name], ref_grads[name], BOUND, f"{name} at batch {batch} x {seq}")
        compiled_model.zero_grad()
        eager.zero_grad()


def _train(model, ids_per_step, lr=0.05):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for ids in ids_per_step:
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def _distributed_worker(rank, world, init_file, out_file, steps, wrapper):
    import os

    import torch.distributed as dist

    os.environ["LORA_KERNELS_CPU_BACKEND"] = "torch"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = peft_model(seed=11, **_WRAPPER_MODELS[wrapper])
        lora_kernels.patch_peft_model(model)
        from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
        if wrapper == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            trained = DistributedDataParallel(model)
        elif wrapper.startswith("fsdp1"):
            # FSDP1 keeping the original parameters (as PEFT needs): each decoder layer, frozen and
            # trainable weights in one flat parameter, or peft's policy (what HF Trainer applies to a
            # PEFT model), which wraps each adapter module on its own
            from peft.utils.other import fsdp_auto_wrap_policy
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy
            policy = (fsdp_auto_wrap_policy(model) if wrapper == "fsdp1_peft_policy"
                      else ModuleWrapPolicy({type(model.base_model.model.model.layers[0])}))
            trained = FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=True,
                                               device_id=torch.device("cpu"))
        else:  # FSDP2: shard every decoder layer (first each adapter module: "fsdp2_adapters"), then the root
            if wrapper == "fsdp2_adapters":
                for name, module in model.named_modules():
                    if name.endswith(("lora_A.default", "lora_B.default")):
                        fully_shard(module)
            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            trained = fully_shard(model)
        with use_backend("torch") as record:
            _train(trained, [ids[rank::world] for ids in steps])
        # the sharded layers ran lora_kernels' op, except where the sharding needs PEFT's forward
        assert _fast_calls(record) == _WRAPPER_FAST_CALLS.get(wrapper, 14) * len(steps)
        if wrapper.startswith("fsdp1"):
            with FullyShardedDataParallel.summon_full_params(trained):  # gather the flat shards
                params = {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                          for n, p in trained.named_parameters() if "lora_" in n}
        else:
            params = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
        if wrapper.startswith("fsdp2"):
            params = {n: p.full_tensor() for n, p in params.items()}  # gather the shards
        if rank == 0:
            torch.save(params, out_file)
        # Both ranks done before either tears the group down: with torch 2.11 a rank destroying gloo
        # while the other still finished its last collective aborted now and then (SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


_WRAPPER_MODELS = {"ddp": {}, "fsdp1": {}, "fsdp1_peft_policy": {}, "fsdp2": {}, "fsdp2_adapters": {},
                   "fsdp2_qlora": {"qlora": True, "quant_storage": torch.float32}, "fsdp2_dora": {"use_dora": True}}
# LoRA layers that run lora_kernels' op per step, of 14, where not all: FSDP1's flat parameter makes the
# frozen base weight a view that requires grad ("the base weight is trainable"); a wrapper around each
# adapter module, or FSDP2's hooks on it, gathers its weight only in its own forward (PEFT's path; before,
# the fast path read the shards: a ValueError, and a DTensor mix error under FSDP2)
_WRAPPER_FAST_CALLS = {"fsdp1": 0, "fsdp1_peft_policy": 0, "fsdp2_adapters": 0}


@pytest.mark.parametrize("wrapper", [pytest.param(w, marks=needs_fsdp2_matching_one_process) if w.startswith("fsdp2")
                                     else w for w in _WRAPPER_MODELS])
def test_two_gloo_processes_match_single_process(tmp_path, wrapper):
    import torch.multiprocessing as mp

    steps = [_ids(seed=20 + i, batch=4) for i in range(2)]
    for attempt in range(2):
        init = tmp_path / f"init{attempt}"
        try:
            mp.spawn(_distributed_worker, args=(2, str(init), str(tmp_path / "out.pt"), steps, wrapper),
                     nprocs=2, join=True)
            break
        except mp.ProcessExitedException as exc:
            # A worker killed by a signal, not by a Python error (those raise ProcessRaisedException and
            # fail here): once in CI a gloo process aborted ("terminate called without an active
            # exception") under the load of two xdist workers; it passed alone every time. One retry.
            if attempt or exc.exit_code is None or exc.exit_code >= 0:
                raise
    distributed = torch.load(tmp_path / "out.pt")
    single = peft_model(seed=11, **_WRAPPER_MODELS[wrapper])
    lora_kernels.patch_peft_model(single)
    _train(single, steps)
    expected = {n: p.detach() for n, p in single.named_parameters() if "lora_" in n}
    # 14 layers x (lora_A, lora_B), and DoRA's magnitude vectors
    assert distributed.keys() == expected.keys() and len(expected) == (42 if "dora" in wrapper else 28)
    initial = {n: p.detach() for n, p in peft_model(seed=11, **_WRAPPER_MODELS[wrapper]).named_parameters()
               if "lora_" in n}
    for n in expected:
        assert not torch.equal(expected[n], initial[n])  # training moved every adapter
        assert_close(distributed[n], expected[n], BOUND, n)


# Relative-error bounds against PEFT of a 16-bit model's (logits, fp32 LoRA gradients): a few 16-bit
# roundings differ per layer (summation order); fp16 keeps 3 more mantissa bits than bf16.
HALF_MODEL_BOUNDS = {torch.bfloat16: (2e-2, 5e-2), torch.float16: (4e-3, 1e-2)}


def _check_half_model_against_peft(backend: str, qlora: bool, dora: bool, dtype=torch.bfloat16,
                                   compute_dtype=None, quant_type="nf4"):
    """A 16-bit Llama (QLoRA: NF4 (``quant_type``) projections quantized from ``dtype`` weights, bnb compute dtype
    ``compute_dtype``, default ``dtype``) with PEFT's fp32 adapters (get_peft_model's
    autocast_adapter_dtype=True: PEFT casts x to fp32 for the LoRA branch, lora_kernels takes the fp32
    adapters as they are), on ``backend``'s device: every layer on the fast path of that backend,
    logits in ``dtype`` and fp32 gradients close to PEFT's."""
    from lora_kernels.tools.models import quantize_projections

    device = "cuda" if backend == "cuda" else "cpu"
    model = tiny_llama(hidden=128, intermediate=256, seed=9).to(device, dtype)
    if qlora:
        pytest.importorskip("bitsandbytes")
        model = quantize_projections(model, compute_dtype=compute_dtype or dtype, targets=TARGETS,
                                     quant_type=quant_type)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False, use_dora=dora)
    reference = peft.get_peft_model(model, cfg)
    assert reference.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    patched = copy.deepcopy(reference)
    assert lora_kernels.patch_peft_model(patched).num_swapped == 14
    ids = _ids().to(device)
    with use_backend(backend) as record:
        out = patched(input_ids=ids, labels=ids)
        out.loss.backward()
    assert set(record.impls()) == {"triton" if backend == "cuda" else backend}
    assert _fast_calls(record) == 14 * (2 if dora and qlora else 1)  # QLoRA DoRA: W A^T on the NF4 GEMM too
    ref = reference(input_ids=ids, labels=ids)
    ref.loss.backward()
    assert out.logits.dtype == ref.logits.dtype == dtype
    logits_bound, grad_bound = HALF_MODEL_BOUNDS[dtype]
    assert_close(out.logits, ref.logits, logits_bound, f"{dtype} logits")
    grads, ref_grads = _lora_grads(patched), _lora_grads(reference)
    assert grads.keys() == ref_grads.keys() and len(grads) == (42 if dora else 28)
    for name in ref_grads:
        assert grads[name].dtype == torch.float32
        assert_close(grads[name], ref_grads[name], grad_bound, name)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "qlora"])
def test_bf16_model_with_fp32_adapters(qlora, dora):
    _check_half_model_against_peft("torch", qlora, dora)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_qlora_model_with_bnb_default_fp32_compute_dtype(backend, dora):
    """fp16 inputs beside bitsandbytes' default fp32 compute dtype (bnb keeps it for fp16 inputs and
    warns that it is slow): bnb multiplies the fp16 values exactly in fp32, so the fused fp16 kernels
    with fp32 accumulation give the same products, and the layers stay on the fast path."""
    _check_half_model_against_peft(backend, qlora=True, dora=dora, dtype=torch.float16, compute_dtype=torch.float32)


def test_qlora_compute_dtype_mixes_that_change_the_product_fall_back():
    from lora_kernels.tools.models import quantize_projections

    pytest.importorskip("bitsandbytes")
    # weights stored in fp32, run in fp16 under an fp32 compute dtype: bnb multiplies the fp32 decode
    model = quantize_projections(tiny_llama(hidden=128, intermediate=256, seed=9), compute_dtype=torch.float32,
                                 targets=TARGETS)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=TARGETS))
    lora_kernels.patch_peft_model(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.base_layer.compute_type_is_set = True  # as after a first forward that kept the fp32 compute dtype
    x = torch.randn(3, 128, dtype=torch.float16)
    assert "compute dtype torch.float32 with input dtype torch.float16" in lk_peft.fallback_reason(layer, x)
    layer.base_layer.compute_dtype = torch.float16  # a 16-bit compute dtype for fp32 inputs: rounds x
    assert "compute dtype torch.float16" in lk_peft.fallback_reason(layer, torch.randn(3, 128))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "qlora"])
def test_bf16_model_on_cuda_matches_peft(qlora, dora):
    # the patched model end to end on the GPU: the Triton kernels (and bnb's CUDA NF4 in PEFT's model)
    _check_half_model_against_peft("cuda", qlora, dora)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_bf16_fp4_qlora_model_matches_peft(backend, dora):
    """bitsandbytes' FP4 weights (on a GPU quantized and decoded by bnb's CUDA kernels) on the fast path."""
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    _check_half_model_against_peft(backend, qlora=True, dora=dora, quant_type="fp4")


@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "qlora"])
def test_autocast_training_step_matches_peft(qlora):
    """Under torch.autocast (what HF Trainer's bf16=True runs on an fp32 model) the patched layers
    stay on the fast path and agree with PEFT's (whose base and LoRA matmuls autocast runs in bf16)
    to bf16 rounding: logits in PEFT's dtype, loss, fp32 LoRA gradients."""
    reference = peft_model(qlora=qlora, seed=5)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    ids = _ids()
    x = torch.randn(2, 7, 128 if qlora else 64, generator=torch.Generator().manual_seed(8))
    with use_backend("torch") as record, torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = patched(input_ids=ids, labels=ids), reference(input_ids=ids, labels=ids)
        layer_out, layer_ref = (m.base_model.model.model.layers[0].mlp.up_proj(x) for m in (patched, reference))
    assert _fast_calls(record) == 15
    # one layer on fp32 x: PEFT's dtype (dense: bf16, as autocast's matmuls; QLoRA: fp32, as bnb
    # returns x's dtype), PEFT's values to bf16 rounding
    assert layer_out.dtype == layer_ref.dtype == (torch.float32 if qlora else torch.bfloat16)
    assert_close(layer_out, layer_ref, 1e-2, "one layer under autocast")
    assert out.logits.dtype == ref.logits.dtype
    assert_close(out.logits, ref.logits, 2e-2, "autocast logits")
    out.loss.backward()
    ref.loss.backward()
    grads, ref_grads = _lora_grads(patched), _lora_grads(reference)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    for name in ref_grads:
        assert grads[name].dtype == torch.float32
        assert_close(grads[name], ref_grads[name], 5e-2, name)


@pytest.mark.skipif(_TORCH_VERSION < (2, 3), reason="torch.amp.GradScaler('cpu') came in torch 2.3")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("qlora,dropout", [(False, 0.0), (False, 0.1), (True, 0.0)],
                         ids=["dense", "dense_dropout", "qlora"])
def test_fp16_grad_scaler_skips_and_steps_as_peft(backend, qlora, dropout):
    """fp16 mixed precision (torch.autocast float16 + GradScaler, HF Trainer's fp16=True): a loss
    scale that overflows fp16 must give non-finite adapter gradients on the patched layers as on
    PEFT's (a kernel that dropped an inf or NaN would let the scaler step on garbage), so both
    scalers skip the same steps and back off to the same scales; the first step taken has PEFT's
    adapter gradients (to fp16 rounding), every step PEFT's loss."""
    reference = peft_model(qlora=qlora, seed=7, dropout=dropout)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    initial = {n: p.detach().clone() for n, p in reference.named_parameters() if "lora_" in n}
    # 2^30 overflows fp16 in the first backward (dlogits ~ 2^30 / tokens); the backoff then lands at
    # 2^8, far from overflow (at 2^18 PEFT's and our dropout masks, which differ, decided whether a
    # gradient overflowed), and no growth follows
    scaler_kwargs = {"init_scale": 2.0 ** 30, "backoff_factor": 2.0 ** -22, "growth_interval": 1000}
    models = (patched, reference)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in models]
    scalers = [torch.amp.GradScaler("cpu", **scaler_kwargs) for _ in models]
    skipped, first_grads = [], []
    with use_backend(backend) as record:
        for step in range(5):
            ids = _ids(seed=40 + step)
            losses, scales, finite = [], [], []
            for model, opt, scaler in zip(models, opts, scalers):
                torch.manual_seed(100 + step)  # the same dropout masks on PEFT's side in every run
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = model(input_ids=ids, labels=ids).loss
                scaler.scale(loss).backward()
                finite.append(all(bool(p.grad.isfinite().all()) for n, p in model.named_parameters()
                                  if "lora_" in n and p.grad is not None))
                if step == 1:  # the first step taken: both models still hold their initial adapters
                    first_grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n})
                scaler.step(opt)
                scaler.update()
                losses.append(loss.item())
                scales.append(scaler.get_scale())
            assert finite[0] == finite[1] and scales[0] == scales[1], (step, finite, scales)
            assert math.isclose(losses[0], losses[1], rel_tol=1e-2), (step, losses)
            skipped.append(not finite[1])
    assert len(record.impls("fwd")) == 14 * 5 and len(record.impls("bwd")) == 14 * 5
    assert skipped == [True, False, False, False, False]  # the overflow was seen, then steps were taken
    grads, ref_grads = first_grads
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    for name in grads:
        assert grads[name].dtype == torch.float32
        if dropout == 0.0:  # with dropout the masks differ (ours are hashed from a seed): losses only
            assert_close(grads[name], ref_grads[name], 2e-2, name)  # fp16 rounding: ~4e-3 seen
    # Not the adapters after the later steps: AdamW's first updates are ~lr * sign(g), which turns
    # fp16 rounding in small gradients into differences of 2 lr. The losses follow the trajectory.
    for model in models:
        for name, p in model.named_parameters():
            if name in initial:
                assert p.isfinite().all() and not torch.equal(p, initial[name]), name


def test_nf4_view_is_cached_and_follows_weight_changes():
    bnb = pytest.importorskip("bitsandbytes")
    reference = peft_model(qlora=True, seed=12)
    patched = copy.deepcopy(reference)
    lora_kernels.patch_peft_model(patched)
    layers = [m.base_model.model.model.layers[0].self_attn.q_proj for m in (patched, reference)]
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    layers[0](x)
    first = layers[0].base_layer.__dict__[lk_peft._NF4_CACHE][1]
    assert_close(layers[0](x), layers[1](x), BOUND, "before")
    assert layers[0].base_layer.__dict__[lk_peft._NF4_CACHE][1] is first  # reused, not rebuilt
    new = torch.randn(128, 128, generator=torch.Generator().manual_seed(3)) / 11
    for layer in layers:  # a new quantized weight (e.g. a checkpoint loaded into the model)
        base = layer.base_layer
        base.weight = bnb.nn.Params4bit(new.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True,
                                        module=base).to("cpu")
    assert_close(layers[0](x), layers[1](x), BOUND, "after")
    assert layers[0].base_layer.__dict__[lk_peft._NF4_CACHE][1] is not first
    lora_kernels.unpatch_peft_model(patched)
    assert lk_peft._NF4_CACHE not in layers[0].base_layer.__dict__


def test_nf4_view_cache_asks_no_data_ptr_of_the_weight_while_compiling(monkeypatch):
    """torch 2.9's dynamo recursed without end through bnb Params4bit.__torch_function__ on the
    weight's data_ptr() (a fullgraph compile of a patched QLoRA model raised RecursionError; CI's
    torch does not): while compiling, the cache key must not ask for it; in eager it does (a weight
    whose storage is swapped in place gets a new view)."""
    pytest.importorskip("bitsandbytes")
    model = peft_model(qlora=True, seed=12)
    lora_kernels.patch_peft_model(model)
    base = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    asked = []
    data_ptr = torch.Tensor.data_ptr
    monkeypatch.setattr(type(base.weight), "data_ptr", lambda self: asked.append(self) or data_ptr(self))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    view = lk_peft._cached_nf4(base)
    assert not any(t is base.weight for t in asked)
    assert lk_peft._cached_nf4(base) is view  # cached while compiling too
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    lk_peft._cached_nf4(base)
    assert any(t is base.weight for t in asked)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("M", [4, 300])  # the small-M routes (aten, GEMV) and the GEMM / slab routes
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "qlora"])
def test_patched_layer_never_synchronizes_cuda(qlora, dropout, M):
    # A call that makes the host wait for the GPU (a device-to-host read, a blocking copy) loses the
    # overlap of host and device at every layer: a training step then takes host + GPU time instead of
    # the larger of the two. torch's sync debug mode raises on every synchronizing CUDA call.
    from lora_kernels.tools.overhead import build_layer

    model = build_layer("lora_kernels_qlora" if qlora else "lora_kernels", 256, 192, 16, torch.device("cuda"),
                        torch.bfloat16)
    layer = model.base_model.model.q_proj
    layer.lora_dropout["default"] = torch.nn.Dropout(dropout)
    x = torch.randn(M, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, 192, device="cuda", dtype=torch.bfloat16)
    assert lk_peft.fallback_reason(layer, x) is None
    model(x).backward(dy)  # the first call compiles and builds the NF4 view
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            model(x).backward(dy)
    finally:
        torch.cuda.set_sync_debug_mode(0)
