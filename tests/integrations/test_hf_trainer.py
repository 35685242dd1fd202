"""transformers.Trainer with a patched PEFT model (the workflow of README's "PEFT models: one line"):
the same logged losses, gradient norms and trained adapters as plain PEFT under the same
TrainingArguments (AdamW, gradient clipping, linear schedule), with LoRA dropout, checkpoint and
resume, gradient checkpointing and bf16 autocast; and QLoRA (the projections bitsandbytes NF4 Linear4bit).
A small Llama of lora_kernels.tools.models (random init, no download), LoRA on its seven projections, B
initialised non-zero so every gradient counts."""
import dataclasses
import math
import os

import pytest
import torch

import lora_kernels
from lora_kernels.integrations import peft as lk_peft
from lora_kernels.ops import dropout_keep_mask
from lora_kernels.tools.models import PRESETS, TARGETS, add_lora, bitsandbytes_importable, build_base_model, \
    quantize_projections
from tests.helpers import SEED_HIGH, assert_close, use_backend

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it
safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture(autouse=True)
def _torch_cpu_path(monkeypatch):
    # The lean PyTorch path (the Triton interpreter would take minutes on a model).
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "torch")


@pytest.fixture(autouse=True)
def _own_environment():
    # TrainingArguments(bf16=True) of transformers 4.5x exports ACCELERATE_MIXED_PRECISION=bf16 into the
    # process environment, which every later Trainer reads: each test gets back the environment it had.
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


PRESET = "tiny"  # hidden 256, intermediate 768, 2 layers, vocab 1000
NUM_LORA_LAYERS = 2 * len(TARGETS)
STEPS, BATCH, SEQ = 4, 2, 16
MAX_GRAD_NORM = 0.5  # below every step's gradient norm (~3-4 here): clipping acts at each step
# Logged losses and eval logits: the suite's fp32 relative bound (measured ~2e-7 after 4 steps).
BOUND = 1e-5
# Gradient norms and trained LoRA weights: AdamW's step m / (sqrt(v) + eps) divides each element by
# its own gradient's magnitude, so an element whose gradient is small carries the rounding difference
# of the layer's large terms (~1e-7 of them) into a step of full size lr, and every later forward
# spreads it. Measured 4e-6 after 4 steps with these seeds, up to 2e-4 over 12 other seeds, 1.2e-4
# with these seeds on peft 0.17 + transformers 4.56; a 0.1% error of the LoRA scale gives >= 1e-3.
TRAINED_BOUND = 4e-4
# transformers 4.x logs losses rounded to 4 decimals: two equal runs may log values one unit apart.
LOGGED_LOSS_ROUNDING = 1e-4
X_ARG, DROPOUT_P_ARG = 0, 6  # torch_lora_forward(x2, weight, lora_A, lora_B, bias, scale, dropout_p, seed)


class TokenDataset(torch.utils.data.Dataset):
    """Fixed random token sequences as a user's tokenized dataset: dicts of input_ids and labels."""

    def __init__(self, n=BATCH * STEPS, seq=SEQ, seed=3):
        vocab = PRESETS[PRESET]["vocab_size"]
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


class RecordingCollator:
    """transformers' default collator, keeping every batch the Trainer trained on (in order)."""

    def __init__(self):
        self.batches = []

    def __call__(self, features):
        batch = transformers.default_data_collator(features)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


class GradientProbe(transformers.TrainerCallback):
    """Per optimizer step (after clipping, before the update): the LoRA parameters whose gradient is
    finite and non-zero."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n for n, p in model.named_parameters() if "lora_" in n and p.grad is not None
                           and p.grad.isfinite().all() and p.grad.abs().sum() > 0})


# QLoRA: the base model's seven projections as bitsandbytes NF4 Linear4bit (block 64, double quantization,
# fp32 compute), made by lora_kernels.tools.models.quantize_projections (Trainer then moves the model with
# .to(device), as for any model without a quantization_method) or loaded as a user loads them:
# from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True)) of the saved base model (a
# Bnb4BitHfQuantizer on the model: Trainer leaves its placement alone). PEFT wraps both in lora.bnb.Linear4bit.
QLORA = ("quantize_projections", "from_pretrained")
needs_bnb = pytest.mark.skipif(not bitsandbytes_importable(), reason="QLoRA needs bitsandbytes")


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    """The base model (seed 0) saved by save_pretrained: what from_pretrained loads in 4 bit."""
    folder = tmp_path_factory.mktemp("base")
    build_base_model(PRESET, seed=0).save_pretrained(str(folder))
    return folder


def base_model(qlora=None, saved=None):
    """The base model (seed 0): dense, or (qlora in QLORA) its projections NF4; "from_pretrained" loads
    ``saved``."""
    if qlora is None:
        return build_base_model(PRESET, seed=0)
    if qlora == "quantize_projections":
        return quantize_projections(build_base_model(PRESET, seed=0), compute_dtype=torch.float32)
    assert qlora == "from_pretrained" and saved is not None, qlora
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(saved), quantization_config=config,
                                                              device_map="cpu", dtype=torch.float32)
    assert model.hf_quantizer is not None and model.is_loaded_in_4bit
    return model


def lora_model(patched: bool, dropout: float = 0.0, qlora=None, saved=None):
    """The PEFT model (r=8, alpha=16, lora_dropout, B random) on ``base_model(qlora, saved)``: same seeds,
    same weights every call. Patched: every LoRA layer swapped (lora.bnb.Linear4bit for QLoRA)."""
    model = add_lora(base_model(qlora, saved), "peft", TARGETS, r=8, alpha=16, device="cpu", seed=1,
                     dropout=dropout)
    if patched:
        report = lora_kernels.patch_peft_model(model)
        kind = "lora.bnb.Linear4bit" if qlora else "lora.Linear"
        assert report.swapped == {kind: NUM_LORA_LAYERS} and not report.left_on_peft, str(report)
    return model


def training_args(output_dir, **overrides):
    settings = dict(output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=BATCH,
                    learning_rate=5e-3, max_grad_norm=MAX_GRAD_NORM, optim="adamw_torch", logging_steps=1,
                    save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                    seed=42, data_seed=7)
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def make_trainer(model, args, callbacks=(), collator=None):
    return transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(), data_collator=collator,
                                callbacks=list(callbacks))


def train(model, args, resume=None, callbacks=(), collator=None, trainer=None):
    """Trainer.train on TokenDataset; returns (trainer, record of lora_kernels' calls)."""
    trainer = trainer or make_trainer(model, args, callbacks, collator)
    with use_backend("torch") as record:
        trainer.train(resume_from_checkpoint=resume)
    return trainer, record


def step_logs(trainer):
    """The per-step entries of log_history (logging_steps=1): loss and pre-clipping grad_norm."""
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logs] == list(range(logs[0]["step"], STEPS + 1)), logs
    return logs


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def dataset_loss(model):
    """Mean loss of the whole dataset in eval mode."""
    ids = TokenDataset().ids
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    model.train(was_training)
    return loss


def assert_same_training(logs, ref_logs, state, ref_state, loss_bound=BOUND, trained_bound=TRAINED_BOUND):
    assert len(logs) == len(ref_logs) == STEPS
    for got, want in zip(logs, ref_logs):
        assert math.isfinite(got["loss"]) and math.isclose(got["loss"], want["loss"], rel_tol=loss_bound,
                                                           abs_tol=LOGGED_LOSS_ROUNDING * 1.01), (got, want)
        assert math.isclose(got["grad_norm"], want["grad_norm"], rel_tol=trained_bound), (got, want)
        assert got["learning_rate"] == want["learning_rate"]
    assert state.keys() == ref_state.keys() and len(state) == 2 * NUM_LORA_LAYERS
    for name in ref_state:
        assert_close(state[name], ref_state[name], trained_bound, name)


def assert_every_adapter_moved(state, initial):
    for name, value in state.items():
        assert (value - initial[name]).norm() > 1e-3 * initial[name].norm(), f"{name} did not train"


# ---------------------------------------------------------------------------------------------
def test_trainer_matches_peft(tmp_path):
    """4 AdamW steps with gradient clipping and the linear schedule: per-step losses, gradient norms and
    the trained adapters equal plain PEFT's, every LoRA layer ran lora_kernels forward and backward,
    and the model learned (its dataset loss fell)."""
    patched, reference = lora_model(patched=True), lora_model(patched=False)
    initial, initial_loss = lora_state(reference), dataset_loss(reference)
    trainer, record = train(patched, training_args(tmp_path / "patched"))
    ref_trainer, ref_record = train(reference, training_args(tmp_path / "peft"))
    assert len(record.impls("fwd")) == len(record.impls("bwd")) == NUM_LORA_LAYERS * STEPS
    assert not ref_record.calls  # the reference is PEFT's own forward
    logs, ref_logs = step_logs(trainer), step_logs(ref_trainer)
    assert all(e["grad_norm"] > MAX_GRAD_NORM for e in ref_logs)  # the clipping changed every step
    state = lora_state(patched)
    assert_same_training(logs, ref_logs, state, lora_state(reference))
    assert_every_adapter_moved(state, initial)
    assert len({e["loss"] for e in logs}) == STEPS
    assert dataset_loss(patched) < initial_loss - 1e-3


def test_trainer_with_lora_dropout(tmp_path):
    """lora_dropout=0.1: the mask is lora_kernels' own draw (not PEFT's), so only what does not depend
    on it is compared with PEFT: dropout acts in training on the fast path, the Trainer's seed decides
    the mask (same seed: the same run), every lora_A and lora_B gets a gradient at every step, and in
    eval mode the trained adapters give PEFT's outputs."""
    model = lora_model(patched=True, dropout=0.1)
    initial, initial_loss = lora_state(model), dataset_loss(model)
    x = torch.randn(3, PRESETS[PRESET]["hidden_size"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert model.training and lk_peft.fallback_reason(layer, x) is None  # dropout in training: fast path
    probe, collator = GradientProbe(), RecordingCollator()
    trainer, record = train(model, training_args(tmp_path / "run"), callbacks=[probe], collator=collator)
    assert len(record.impls("fwd")) == len(record.impls("bwd")) == NUM_LORA_LAYERS * STEPS
    logs = step_logs(trainer)
    assert len(logs) == STEPS and all(math.isfinite(e["loss"]) and math.isfinite(e["grad_norm"]) for e in logs)
    assert len(collator.batches) == STEPS
    # The first step's loss without dropout (same weights, same batch), as the Trainer logs it: its loss
    # is not the model's mean in every release (transformers 4.5x divides by the unshifted label count).
    without, _ = train(lora_model(patched=True), training_args(tmp_path / "without", max_steps=1))
    loss_without_dropout = without.state.log_history[0]["loss"]
    assert not math.isclose(logs[0]["loss"], loss_without_dropout, rel_tol=1e-6), "dropout did not act"
    # a perturbation, not another model: over masks the loss moves ~0.3-0.5% (sd) from its dropout-free value
    assert math.isclose(logs[0]["loss"], loss_without_dropout, rel_tol=5e-2)
    names = set(initial)
    assert len(probe.steps) == STEPS and all(step == names for step in probe.steps)
    state = lora_state(model)
    assert_every_adapter_moved(state, initial)
    assert dataset_loss(model) < initial_loss - 1e-3

    again, _ = train(lora_model(patched=True, dropout=0.1), training_args(tmp_path / "again"))
    assert [e["loss"] for e in step_logs(again)] == [e["loss"] for e in logs]  # the Trainer's seed: same masks
    other, _ = train(lora_model(patched=True, dropout=0.1), training_args(tmp_path / "other", seed=43))
    assert [e["loss"] for e in step_logs(other)] != [e["loss"] for e in logs]  # same batches, other masks

    reference = lora_model(patched=False, dropout=0.1)
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and not [n for n in missing if "lora_" in n]
    model.eval()
    reference.eval()
    ids = TokenDataset().ids
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, BOUND, "eval logits")


class KernelMaskDropout(torch.nn.Module):
    """nn.Dropout(p) with lora_kernels' mask, for PEFT's own forward: the seed drawn from torch's RNG at
    the point of the call where the patched layer draws it (tests.helpers.seed_after_manual_seed's
    draw), the keep-mask of the row-major [M, K] input from lora_kernels.ops.dropout_keep_mask."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        seed = torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64, device=x.device)
        keep = dropout_keep_mask(seed, x.numel() // x.shape[-1], x.shape[-1], self.p).reshape(x.shape)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


def test_trainer_with_lora_dropout_matches_peft_with_the_same_masks(tmp_path):
    """lora_dropout=0.1 against PEFT's forward with lora_kernels' masks in its lora_dropout modules (the
    patched layers take no mask from PEFT's nn.Dropout): the same losses, gradient norms and trained
    adapters, so the fast path's dropout, in forward and in the gradients, is PEFT's with that mask."""
    patched, reference = lora_model(patched=True, dropout=0.1), lora_model(patched=False, dropout=0.1)
    layers = [m for m in reference.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(layers) == NUM_LORA_LAYERS
    for layer in layers:
        layer.lora_dropout["default"] = KernelMaskDropout(0.1)
    initial = lora_state(reference)
    trainer, record = train(patched, training_args(tmp_path / "patched"))
    ref_trainer, ref_record = train(reference, training_args(tmp_path / "peft"))
    assert len(record.impls("fwd")) == NUM_LORA_LAYERS * STEPS and not ref_record.calls
    assert all(args[DROPOUT_P_ARG] == 0.1 for _, kind, args in record.calls if kind == "fwd")  # dropout_p: in training
    state = lora_state(patched)
    assert_same_training(step_logs(trainer), step_logs(ref_trainer), state, lora_state(reference))
    assert_every_adapter_moved(state, initial)


def test_checkpoint_resume_and_adapter_files(tmp_path):
    """save_steps=2, lora_dropout=0.1: a fresh patched model resumed from checkpoint-2 ends at the
    uninterrupted run's adapters (the checkpoint restores weights, AdamW moments, schedule and torch's
    RNG, which the dropout seeds come from: the same operations on the same values, so equal bit for
    bit), its LoRA layers still on lora_kernels; checkpoint-4's adapter files are PEFT's and load
    into plain PEFT with the trained weights and, in eval mode, its outputs."""
    model = lora_model(patched=True, dropout=0.1)
    trainer, _ = train(model, training_args(tmp_path / "full", save_strategy="steps", save_steps=2))
    full_logs, full_state = step_logs(trainer), lora_state(model)
    checkpoints = sorted(p.name for p in (tmp_path / "full").iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]

    resumed = lora_model(patched=True, dropout=0.1)
    resumed_trainer, record = train(resumed, training_args(tmp_path / "resumed", save_strategy="steps", save_steps=2),
                                    resume=str(tmp_path / "full" / "checkpoint-2"))
    assert len(record.impls("fwd")) == len(record.impls("bwd")) == NUM_LORA_LAYERS * (STEPS - 2)
    assert all(lk_peft.is_patched(m) for m in resumed.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert resumed_trainer.state.global_step == STEPS
    resumed_logs = step_logs(resumed_trainer)  # steps 1-2 restored from the checkpoint, 3-4 run here
    assert [(e["step"], e["loss"], e["grad_norm"]) for e in resumed_logs] == \
        [(e["step"], e["loss"], e["grad_norm"]) for e in full_logs]
    resumed_state = lora_state(resumed)
    assert resumed_state.keys() == full_state.keys()
    for name in full_state:
        assert torch.equal(resumed_state[name], full_state[name]), name

    folder = tmp_path / "full" / "checkpoint-4"
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
    saved = safetensors_torch.load_file(str(folder / "adapter_model.safetensors"))
    # the tensors PEFT's own model writes (no extra tensor from the patch), with the trained values
    want = peft.get_peft_model_state_dict(model)
    assert saved.keys() == peft.get_peft_model_state_dict(lora_model(patched=False, dropout=0.1)).keys() == want.keys()
    assert all(torch.equal(saved[k], want[k]) for k in want)
    loaded = peft.PeftModel.from_pretrained(build_base_model(PRESET, seed=0), str(folder))
    assert not any(lk_peft.is_patched(m) for m in loaded.modules())
    assert lora_state(loaded).keys() == full_state.keys()
    for name, value in lora_state(loaded).items():
        assert torch.equal(value, full_state[name]), name
    ids = TokenDataset().ids
    model.eval()
    loaded.eval()
    with torch.no_grad(), use_backend("torch") as eval_record:
        out = model(input_ids=ids, labels=ids)
    assert len(eval_record.impls("fwd")) == NUM_LORA_LAYERS
    with torch.no_grad():
        ref = loaded(input_ids=ids, labels=ids)
    assert_close(out.logits, ref.logits, BOUND, "logits of the checkpoint in plain PEFT")


def for_checkpointing(model, use_reentrant: bool):
    """The model as a user readies it for gradient checkpointing: a reentrant checkpoint gives its LoRA
    layers no gradient unless its input requires grad (the frozen embeddings' output does not), so
    ``enable_input_require_grads`` then, as PEFT's docs say; transformers 5 calls it itself, 4.x does
    not for a PeftModel."""
    if use_reentrant:
        model.enable_input_require_grads()
    return model


def checkpointing_args(use_reentrant: bool) -> dict:
    """TrainingArguments' gradient_checkpointing=True with its kwargs. transformers 5.x renamed both
    to activation_checkpointing* (the old names warn, and go in v6); older releases have the old only."""
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in fields else "gradient"
    return {f"{prefix}_checkpointing": True, f"{prefix}_checkpointing_kwargs": {"use_reentrant": use_reentrant}}


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_matches_peft(tmp_path, use_reentrant):
    """TrainingArguments(gradient_checkpointing=True): every layer's forward runs again in backward (on
    lora_kernels), and losses, gradient norms and adapters equal PEFT's under the same arguments."""
    settings = checkpointing_args(use_reentrant)
    patched, reference = (for_checkpointing(lora_model(patched=p), use_reentrant) for p in (True, False))
    initial = lora_state(reference)
    trainer, record = train(patched, training_args(tmp_path / "patched", **settings))
    ref_trainer, _ = train(reference, training_args(tmp_path / "peft", **settings))
    assert len(record.impls("fwd")) == 2 * NUM_LORA_LAYERS * STEPS  # the recomputation ran on lora_kernels too
    assert len(record.impls("bwd")) == NUM_LORA_LAYERS * STEPS
    state = lora_state(patched)
    assert_same_training(step_logs(trainer), step_logs(ref_trainer), state, lora_state(reference))
    assert_every_adapter_moved(state, initial)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_with_dropout_recomputes_the_same_masks(tmp_path, use_reentrant):
    """lora_dropout=0.1 under gradient checkpointing: the recomputed forward draws the dropout seed again
    from torch's RNG, which checkpoint restores, so the masks of forward and backward agree and the run
    is the run without checkpointing (losses, gradient norms, adapters)."""
    model = lora_model(patched=True, dropout=0.1)
    checkpointed = for_checkpointing(lora_model(patched=True, dropout=0.1), use_reentrant)
    trainer, _ = train(model, training_args(tmp_path / "plain"))
    settings = checkpointing_args(use_reentrant)
    ck_trainer, record = train(checkpointed, training_args(tmp_path / "checkpointed", **settings))
    assert len(record.impls("fwd")) == 2 * NUM_LORA_LAYERS * STEPS
    assert all(args[DROPOUT_P_ARG] == 0.1 for _, kind, args in record.calls if kind == "fwd")  # dropout_p: in training
    assert_same_training(step_logs(ck_trainer), step_logs(trainer), lora_state(checkpointed), lora_state(model))


def test_bf16_autocast_matches_peft(tmp_path):
    """TrainingArguments(bf16=True) on the fp32 model: Trainer runs forward under CPU bf16 autocast; the
    patched layers stay on the fast path, in bf16, and the losses and adapters agree with PEFT's under
    the same arguments to bf16 rounding."""
    patched, reference = lora_model(patched=True), lora_model(patched=False)
    try:  # TrainingArguments or accelerate refuse bf16 where the CPU lacks it (training errors fail)
        trainer = make_trainer(patched, training_args(tmp_path / "patched", bf16=True))
    except ValueError as exc:
        if "bf16" not in str(exc).lower() and "bfloat16" not in str(exc).lower():
            raise
        pytest.skip(f"Trainer refuses bf16 here: {exc}")
    trainer, record = train(patched, None, trainer=trainer)
    ref_trainer, _ = train(reference, training_args(tmp_path / "peft", bf16=True))
    assert len(record.impls("fwd")) == len(record.impls("bwd")) == NUM_LORA_LAYERS * STEPS
    x_dtypes = {args[X_ARG].dtype for _, kind, args in record.calls if kind == "fwd"}
    assert x_dtypes == {torch.bfloat16}, x_dtypes  # autocast's dtype reached the kernels
    logs, ref_logs = step_logs(trainer), step_logs(ref_trainer)
    # The first step's loss and gradient norm come from equal weights: bf16 rounding of the same
    # products summed in another order (measured 2e-5 and 5e-4). Later steps add AdamW's
    # amplification of that rounding (see TRAINED_BOUND): losses measured up to 8e-4, adapters up to
    # 5e-2 (PEFT's own bf16 run is as far from its fp32 run).
    assert math.isclose(logs[0]["grad_norm"], ref_logs[0]["grad_norm"], rel_tol=5e-3), (logs[0], ref_logs[0])
    for got, want in zip(logs, ref_logs):
        assert math.isclose(got["loss"], want["loss"], rel_tol=5e-3), (got, want)
    state, ref_state = lora_state(patched), lora_state(reference)
    assert state.keys() == ref_state.keys()
    for name in ref_state:
        assert_close(state[name], ref_state[name], 0.1, name)


# ---------------------------------------------------------------------------------------------
# QLoRA
# ---------------------------------------------------------------------------------------------
FWD_WEIGHT_ARG, BWD_WEIGHT_ARG = 1, 2  # torch_lora_backward(grad_y2, x2, weight, ...): None for NF4 (wq= instead)


def assert_ran_nf4(record, forwards, backwards):
    """The record holds ``forwards`` forward and ``backwards`` backward calls, all of the NF4 op's (the
    dense weight None: the NF4 weight goes as wq=, decoded by lora_kernels; tests.helpers.use_backend
    records positional arguments)."""
    fwd = [args for _, kind, args in record.calls if kind == "fwd"]
    bwd = [args for _, kind, args in record.calls if kind == "bwd"]
    assert (len(fwd), len(bwd)) == (forwards, backwards)
    assert all(args[FWD_WEIGHT_ARG] is None for args in fwd) and all(args[BWD_WEIGHT_ARG] is None for args in bwd)


def nf4_bytes(model):
    """The packed NF4 bytes of every Linear4bit (frozen: training must leave them)."""
    import bitsandbytes as bnb
    return {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def repacked(model):
    """The Linear4bit layers bitsandbytes repacked for its CPU inference kernel. bitsandbytes 0.50.2 does
    so, for good, at its own forward of an eval-mode layer on an input without grad on a CPU with
    AVX512-BF16; its later training forwards then run bitsandbytes::gemv_4bit, which has no autograd
    kernel: the input's gradient through the layer is silently dropped, and the outputs change. So
    plain PEFT's reference is never run in eval mode before its training here (dataset_loss of the
    patched model instead, whose layers decode the weight themselves and do not repack it)."""
    import bitsandbytes as bnb
    return [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)
            and getattr(m.weight.quant_state, "packing_format_for_cpu", False)]


@needs_bnb
@pytest.mark.parametrize("qlora", QLORA)
def test_qlora_trainer_matches_peft(tmp_path, saved_base, qlora):
    """QLoRA under Trainer (4 AdamW steps, clipping, linear schedule): the patched layers run lora_kernels'
    NF4 op forward and backward at every step, and losses, gradient norms and trained adapters equal
    plain PEFT's (bitsandbytes' own 4-bit forward) to the dense run's bounds; the NF4 weights stay as they
    were and the model learned. Both ways of quantizing give the same bytes and the same run. Measured
    after 4 steps: losses 2e-7, gradient norms 7e-6, adapters 1.4e-5 (a 0.1% LoRA scale error: gradient
    norm 1e-3 at step 1). The AdamW amplification of TRAINED_BOUND is the same as dense: over 12 other
    Trainer and data seeds the worst were 5e-7, 2e-4, 1e-4 (dense: 1.4e-6, 9e-5, 8e-5), and these seeds
    on peft 0.17 + transformers 4.56 gave adapters 1.2e-4: TRAINED_BOUND (4e-4) keeps a 2x margin over
    the worst and stays below what a 0.1% scale error gives, as for the dense tests."""
    patched = lora_model(True, qlora=qlora, saved=saved_base)
    reference = lora_model(False, qlora=qlora, saved=saved_base)
    quantized = nf4_bytes(patched)
    assert len(quantized) == NUM_LORA_LAYERS and all(q.dtype == torch.uint8 for q in quantized.values())
    initial, initial_loss = lora_state(reference), dataset_loss(patched)
    assert not repacked(patched)  # its eval forward ran on lora_kernels, not on bitsandbytes' CPU kernel
    trainer, record = train(patched, training_args(tmp_path / "patched"))
    ref_trainer, ref_record = train(reference, training_args(tmp_path / "peft"))
    assert not repacked(reference)
    assert_ran_nf4(record, NUM_LORA_LAYERS * STEPS, NUM_LORA_LAYERS * STEPS)
    assert not ref_record.calls
    logs, ref_logs = step_logs(trainer), step_logs(ref_trainer)
    assert all(e["grad_norm"] > MAX_GRAD_NORM for e in ref_logs)
    state = lora_state(patched)
    assert_same_training(logs, ref_logs, state, lora_state(reference))
    assert_every_adapter_moved(state, initial)
    after = nf4_bytes(patched)
    assert after.keys() == quantized.keys() and all(torch.equal(after[n], quantized[n]) for n in quantized)
    assert dataset_loss(patched) < initial_loss - 1e-3


@needs_bnb
def test_qlora_checkpoint_resume(tmp_path):
    """QLoRA, lora_dropout=0.1, save_steps=2: resumed from checkpoint-2, a fresh patched model ends at the
    uninterrupted run's logs and adapters bit for bit, on lora_kernels' NF4 op; checkpoint-4 holds
    PEFT's adapter tensors with the trained values."""
    model = lora_model(True, dropout=0.1, qlora="quantize_projections")
    trainer, _ = train(model, training_args(tmp_path / "full", save_strategy="steps", save_steps=2))
    full_logs, full_state = step_logs(trainer), lora_state(model)
    resumed = lora_model(True, dropout=0.1, qlora="quantize_projections")
    resumed_trainer, record = train(resumed, training_args(tmp_path / "resumed", save_strategy="steps", save_steps=2),
                                    resume=str(tmp_path / "full" / "checkpoint-2"))
    assert_ran_nf4(record, NUM_LORA_LAYERS * (STEPS - 2), NUM_LORA_LAYERS * (STEPS - 2))
    assert all(args[DROPOUT_P_ARG] == 0.1 for _, kind, args in record.calls if kind == "fwd")  # dropout on NF4
    assert resumed_trainer.state.global_step == STEPS
    assert [(e["step"], e["loss"], e["grad_norm"]) for e in step_logs(resumed_trainer)] == \
        [(e["step"], e["loss"], e["grad_norm"]) for e in full_logs]
    resumed_state = lora_state(resumed)
    assert resumed_state.keys() == full_state.keys()
    for name in full_state:
        assert torch.equal(resumed_state[name], full_state[name]), name
    saved = safetensors_torch.load_file(str(tmp_path / "full" / "checkpoint-4" / "adapter_model.safetensors"))
    want = peft.get_peft_model_state_dict(model)
    assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in want)
