"""End-to-end training benchmark: full AdamW steps of the built-in Llama model, PEFT vs lora_kernels.

``python -m lora_kernels bench --train [options]`` (or ``python -m lora_kernels.tools.train_bench``).

Variants (rows), each built by ``models.build_lora_model`` with the same seed (same base weights,
same adapters) and trained on the same sequence of random batches (labels = input_ids, causal LM
loss):
    peft                   PEFT ``lora.Linear`` on the seven projections
    lora_kernels           the same model patched with ``lora_kernels.patch_peft_model``
    lora_kernels_fa        patched with ``lora_fa=True`` (lora_A frozen: fewer trainable parameters)
    peft_qlora             PEFT ``lora.bnb.Linear4bit`` on bitsandbytes NF4 ``Linear4bit`` projections
    lora_kernels_qlora     the QLoRA model patched
    lora_kernels_qlora_fa  the QLoRA model patched with ``lora_fa=True``
The QLoRA rows need bitsandbytes (skipped with a warning when it does not import). Opt-in rows (not
run unless named in ``variants``; CUDA only, ``skipped`` elsewhere) time the dispatch routes written
without a GPU, beside the default they would replace:
    lora_kernels_cublas    lora_kernels with the dense base products on cuBLAS (DENSE_CUBLAS_MIN_M = 1)
    lora_kernels_qlora_cuda_decode  lora_kernels_qlora with the large-M slabs decoded by the CUDA kernel
                           of csrc/ (LORA_KERNELS_NF4_SLAB_DECODER=cuda; needs the built extension)
    lora_kernels_qlora_triton_decode  lora_kernels_qlora with every large-M slab decoded by the Triton
                           tiles (LORA_KERNELS_NF4_SLAB_DECODER=triton; the default decodes the forward's
                           with bitsandbytes' kernel)

One step: ``zero_grad(set_to_none=True)``, forward with labels, ``loss.backward()``, AdamW step over
the trainable parameters. Warm-up steps run untimed (they also absorb Triton JIT and autotuning);
each timed step is bracketed by ``torch.cuda.synchronize`` + ``time.perf_counter`` (CPU:
``perf_counter``). Reported per row: median step time, tokens/s = batch * seq / median, CUDA peak
``max_memory_allocated`` over the timed steps (weights, optimizer state and activations; None on
CPU), the loss of every step (warm-up included), and, against the PEFT row of the same family
(dense or QLoRA): ``speedup_vs_peft`` (PEFT median / this median), ``peak_ratio_vs_peft``,
``max_loss_diff_vs_peft`` (max |loss - PEFT loss| over the steps) and ``first_loss_diff_vs_peft``.
On CUDA one more step runs under torch.profiler: ``gpu_kernel_ms`` (its kernels' summed time),
``kernels_per_step`` and ``gpu_busy_fraction`` = gpu_kernel_ms / median step: near 1 the GPU bounds
the step, well below 1 the host does (Python and launches between kernels). The same step's kernel
time is split by kind (``gpu_ms_<kind>``: lora_kernels' own kernels, bitsandbytes, matmuls,
attention, loss, optimizer, other; ``KERNEL_CATEGORIES``) with its most expensive kernels
(``top_kernels``): what a faster LoRA layer can change, and what no LoRA kernel touches.
Patched full-LoRA rows must match PEFT's losses to rounding; the LoRA-FA rows train only lora_B, so
their losses leave PEFT's after the first step (the first one must still match). With dropout > 0
the masks come from different generators, so losses differ from the first step.
"""
import argparse
import functools
import math
import statistics
import time
import warnings
from pathlib import Path

import torch

from lora_kernels.tools.bench import (DTYPES, default_out_dir, environment_metadata, fmt_num, format_goals,
                                      goal_check, mib, ratio, resolve_device_dtype, standalone_main, with_env,
                                      write_outputs)
from lora_kernels.tools.report import absolute_times
from lora_kernels.tools.models import bitsandbytes_importable, free_memory

# name -> (models.ModelSpec variant, qlora)
VARIANTS = {
    "peft": ("peft", False),
    "lora_kernels": ("lora_kernels", False),
    "lora_kernels_fa": ("lora_kernels_fa", False),
    "peft_qlora": ("peft", True),
    "lora_kernels_qlora": ("lora_kernels", True),
    "lora_kernels_qlora_fa": ("lora_kernels_fa", True),
}
# Opt-in rows: name -> (models.ModelSpec variant, qlora, {environment variable: value} during the run)
OPT_IN_VARIANTS = {
    "lora_kernels_cublas": ("lora_kernels", False, {"LORA_KERNELS_DENSE_CUBLAS_MIN_M": 1}),
    "lora_kernels_qlora_cuda_decode": ("lora_kernels", True, {"LORA_KERNELS_NF4_SLAB_DECODER": "cuda"}),
    "lora_kernels_qlora_triton_decode": ("lora_kernels", True, {"LORA_KERNELS_NF4_SLAB_DECODER": "triton"}),
}
ALL_VARIANTS = {**VARIANTS, **{name: spec[:2] for name, spec in OPT_IN_VARIANTS.items()}}
PEFT_REF = {False: "peft", True: "peft_qlora"}  # the reference row of each family
CPU_DEFAULTS = dict(preset="tiny", batch=2, seq=64, steps=5, warmup_steps=1)
# 1b: 4 x 1024 tokens per step. The 128k-vocabulary logits (bf16, then fp32 inside the loss, and their
# gradients) take ~6 GiB at this size; the whole step peaks well under 30 GiB, far below an H100/H200.
CUDA_DEFAULTS = dict(preset="1b", batch=4, seq=1024, steps=20, warmup_steps=3)
# Goal of the end-to-end issue, checked on GPU results: QLoRA tokens/s, patched over PEFT + bitsandbytes.
GOALS = {"qlora_tokens_per_s_vs_peft_min": 1.5}
# Kinds of GPU kernels in the profiled step, by lower-case substrings of the kernel's name; the first
# kind that matches wins, so lora_kernels' own kernels (``our_kernel_names``: a Triton kernel's name is
# its function's, e.g. lora_forward_gemm_kernel; the CUDA ones of csrc/ live in namespace
# lora_kernels) come before the generic "gemm".
KERNEL_CATEGORIES = (
    ("bitsandbytes", ("dequantizeblockwise", "quantizeblockwise", "gemm_4bit")),
    ("matmul", ("gemm", "gemv", "nvjet", "xmma", "cutlass", "splitkreduce")),
    ("attention", ("flash", "fmha", "attention")),
    ("loss", ("softmax", "nll_loss", "cross_entropy")),
    ("optimizer", ("multi_tensor_apply", "adam")),
)
OURS = "lora_kernels"
OTHER = "other"
CATEGORY_NAMES = (OURS, *(name for name, _ in KERNEL_CATEGORIES), OTHER)
TOP_KERNELS = 8  # most expensive kernels of the profiled step kept per row
TRAIN_CSV_FIELDS = ["variant", "family", "trainable_params", "patched_layers", "median_step_ms", "min_step_ms",
                    "tokens_per_s", "speedup_vs_peft", "peak_bytes", "peak_ratio_vs_peft", "first_loss",
                    "final_loss", "max_loss_diff_vs_peft", "first_loss_diff_vs_peft", "gpu_kernel_ms",
                    "kernels_per_step", "gpu_busy_fraction", *(f"gpu_ms_{name}" for name in CATEGORY_NAMES)]


# ----------------------------------------------------------------------------- argument checks

def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_variants(variants) -> list:
    if isinstance(variants, str):
        variants = [v for v in variants.split(",") if v]
    variants = list(variants)
    if not variants:
        raise ValueError(f"variants must name at least one of {list(ALL_VARIANTS)}")
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown:
        raise ValueError(f"variants: unknown {unknown}; choose from {list(ALL_VARIANTS)}")
    if len(set(variants)) != len(variants):
        raise ValueError(f"variants must not repeat a name, got {variants}")
    return variants


def _check_float(name: str, value, low: float, high: float, low_open: bool, high_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (math.isfinite(value) and ok_low and ok_high):
        span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {span}, got {value!r}")
    return value


def available_variants(variants, device: torch.device) -> tuple:
    """(``variants`` that can run here, {skipped variant: why}): the QLoRA rows need bitsandbytes
    (warns), the opt-in rows a GPU (their routes exist on CUDA only), the CUDA decode row the built
    extension."""
    skipped = {}
    qlora = [v for v in variants if ALL_VARIANTS[v][1]]
    if qlora and not bitsandbytes_importable():  # the dense rows are still worth measuring
        warnings.warn(f"bitsandbytes unavailable; skipping the QLoRA rows {qlora}")
        skipped.update({v: "bitsandbytes unavailable" for v in qlora})
    for v in variants:
        if v in OPT_IN_VARIANTS and v not in skipped:
            if device.type != "cuda":
                skipped[v] = "CUDA only: the route it times exists on CUDA only"
            elif v == "lora_kernels_qlora_cuda_decode":
                from lora_kernels.ops.nf4_gemv import load_extension
                if not load_extension():
                    skipped[v] = "needs the built lora_kernels._C extension"
    return [v for v in variants if v not in skipped], skipped


# ----------------------------------------------------------------------------- one variant

def _fallback_probe(model):
    """Forward pre-hooks on every patched PEFT layer that count, per call, whether lora_kernels'
    fast path runs or why the layer falls back to PEFT's forward. Returns (counts, remove)."""
    from lora_kernels.integrations.peft import fallback_reason, is_patched

    counts = {}
    handles = []

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        rest = {k: v for k, v in kwargs.items() if k != "x"}
        reason = fallback_reason(module, x, args[1:], rest) or "fast path"
        counts[reason] = counts.get(reason, 0) + 1

    for m in model.modules():
        if is_patched(m):
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))

    def remove():
        for h in handles:
            h.remove()
    return counts, remove


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_variant(name: str, *, preset: str, device: torch.device, dtype: torch.dtype, batch: int, seq: int,
                  steps: int, warmup_steps: int, lr: float, dropout: float, r: int, seed: int,
                  dora: bool = False) -> dict:
    """Builds variant ``name`` and runs ``warmup_steps`` untimed + ``steps`` timed training steps on
    input_ids [batch, seq] (step i draws its batch with seed ``seed + 1 + i``: every variant sees the
    same batches). Returns the raw measurements (losses of all steps, timed step times in ms, CUDA peak
    bytes over the timed steps, trainable parameters, patched layers, and per patched layer call of the
    first step whether it took the fast path or why it fell back: counted by forward pre-hooks that are
    removed after that step, a warm-up step unless ``warmup_steps`` is 0)."""
    from lora_kernels.integrations.peft import is_patched
    from lora_kernels.tools.models import ModelSpec, build_lora_model, random_batch

    variant, qlora = ALL_VARIANTS[name]
    spec = ModelSpec(preset=preset, variant=variant, qlora=qlora, dropout=dropout, r=r, alpha=2 * r, dora=dora)
    model = build_lora_model(spec, device, dtype, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    # Batches made before timing: drawing them is not part of a training step.
    inputs = [random_batch(preset, batch, seq, device, seed=seed + 1 + i) for i in range(warmup_steps + steps)]
    patched_layers = sum(is_patched(m) for m in model.modules())
    path_counts, remove_probe = _fallback_probe(model)

    def step(input_ids):
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    torch.manual_seed(seed)  # same RNG stream for every variant (dropout masks, if any)
    losses, step_ms = [], []
    peak = None
    profiled = {}
    try:
        for i, input_ids in enumerate(inputs):
            if i == warmup_steps:
                _sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
            timed = i >= warmup_steps
            _sync(device)
            t0 = time.perf_counter()
            losses.append(step(input_ids))
            _sync(device)
            if timed:
                step_ms.append((time.perf_counter() - t0) * 1e3)
            if i == 0:
                remove_probe()  # the layers' paths are known after one step; hooks cost time
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            profiled = gpu_kernel_time(lambda: step(inputs[-1]), device)
    finally:
        remove_probe()
    trainable = sum(p.numel() for p in params)
    del model, optimizer, params, inputs
    return {"losses": [float(v) for v in losses], "step_ms": step_ms, "peak_bytes": peak,
            "trainable_params": trainable, "patched_layers": patched_layers, "first_step_paths": dict(path_counts),
            "gpu_kernel_ms": profiled.get("gpu_kernel_ms"), "kernels_per_step": profiled.get("kernels_per_step"),
            "gpu_ms_by_category": profiled.get("gpu_ms_by_category"), "top_kernels": profiled.get("top_kernels")}


def our_kernel_names() -> frozenset:
    """Names of lora_kernels' Triton kernels (the ``*_kernel`` functions of ``lora_kernels.kernels``)."""
    from lora_kernels.kernels import lora_backward, lora_forward, nf4
    return frozenset(name for module in (lora_forward, lora_backward, nf4) for name, obj in vars(module).items()
                     if name.endswith("_kernel") and hasattr(obj, "fn"))


def kernel_category(name: str, ours: frozenset) -> str:
    """The kind (one of ``CATEGORY_NAMES``) of a GPU kernel called ``name`` in a profile: lora_kernels'
    own (a name in ``ours``, or in C++ namespace lora_kernels), else the first ``KERNEL_CATEGORIES``
    entry with a substring in the lower-cased name, else "other" (elementwise ops, norms, copies...)."""
    if name in ours or "lora_kernels::" in name:
        return OURS
    lower = name.lower()
    for category, parts in KERNEL_CATEGORIES:
        if any(part in lower for part in parts):
            return category
    return OTHER


def summarize_kernels(kernels, ours: frozenset, top: int = TOP_KERNELS) -> dict:
    """Per-step summary of profiled GPU kernels, ``kernels`` an iterable of (name, time in µs):
    gpu_kernel_ms (summed), kernels_per_step, gpu_ms_by_category (ms per ``CATEGORY_NAMES`` entry, each
    present) and top_kernels (the ``top`` names with the most summed time: name, category, ms, calls)."""
    by_category = dict.fromkeys(CATEGORY_NAMES, 0.0)
    by_name: dict = {}
    count = 0
    for name, us in kernels:
        count += 1
        by_category[kernel_category(name, ours)] += us / 1e3
        total, calls = by_name.get(name, (0.0, 0))
        by_name[name] = (total + us / 1e3, calls + 1)
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
    return {"gpu_kernel_ms": sum(by_category.values()), "kernels_per_step": count,
            "gpu_ms_by_category": by_category,
            "top_kernels": [{"name": name, "category": kernel_category(name, ours), "ms": ms, "calls": calls}
                            for name, (ms, calls) in ranked]}


def gpu_kernel_time(step, device: torch.device) -> dict:
    """``summarize_kernels`` of the GPU kernels of one more call of ``step`` under torch.profiler.
    Beside the step's wall time it says what bounds the step: kernel time close to the wall time means
    the GPU is busy throughout; far below it, the GPU waits for the host (Python, launches) between
    kernels. An empty dict where the profiler cannot say (a warning says why)."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize(device)
        kernels = [(e.name, e.device_time) for e in prof.events()
                   if getattr(e, "device_type", None) == DeviceType.CUDA]
        return summarize_kernels(kernels, our_kernel_names())
    except Exception as exc:  # a measurement aid: never the reason a benchmark fails
        warnings.warn(f"GPU kernel time not measured: {exc!r}")
        return {}


def _max_abs_diff(a, b):
    n = min(len(a), len(b))
    return max(abs(x - y) for x, y in zip(a[:n], b[:n])) if n else None


def make_rows(raw: dict, batch: int, seq: int) -> list:
    """Rows (one per variant in ``raw``: name -> ``train_variant`` result) with the summary statistics and
    the comparisons against the PEFT row of the same family (None where that row did not run)."""
    rows = []
    medians = {n: statistics.median(m["step_ms"]) for n, m in raw.items()}
    for n, m in raw.items():
        qlora = ALL_VARIANTS[n][1]
        ref = PEFT_REF[qlora]
        ref_raw = raw.get(ref)
        med = medians[n]
        rows.append({
            "variant": n, "family": "qlora" if qlora else "dense", "peft_ref": ref if ref_raw else None,
            "trainable_params": m["trainable_params"], "patched_layers": m["patched_layers"],
            "first_step_paths": m["first_step_paths"],
            "median_step_ms": med, "min_step_ms": min(m["step_ms"]), "step_ms": m["step_ms"],
            "gpu_kernel_ms": m.get("gpu_kernel_ms"), "kernels_per_step": m.get("kernels_per_step"),
            "gpu_busy_fraction": ratio(m.get("gpu_kernel_ms"), med),
            "top_kernels": m.get("top_kernels"),
            **{f"gpu_ms_{name}": (m.get("gpu_ms_by_category") or {}).get(name) for name in CATEGORY_NAMES},
            "tokens_per_s": batch * seq / (med / 1e3),
            "speedup_vs_peft": ratio(medians.get(ref), med),
            "peak_bytes": m["peak_bytes"],
            "peak_ratio_vs_peft": ratio(m["peak_bytes"], ref_raw["peak_bytes"]) if ref_raw else None,
            "losses": m["losses"], "first_loss": m["losses"][0], "final_loss": m["losses"][-1],
            "max_loss_diff_vs_peft": _max_abs_diff(m["losses"], ref_raw["losses"]) if ref_raw else None,
            "first_loss_diff_vs_peft": abs(m["losses"][0] - ref_raw["losses"][0]) if ref_raw else None,
        })
    return rows


def check_goals(rows, requested=()) -> list:
    """The issue's goal evaluated on ``rows`` (meaningful on GPU results only), in qlora_bench's format:
    one entry per goal with the measured ratio, the bound ("min": the ratio must reach it) and whether
    it is met. The ratio is lora_kernels_qlora tokens/s over peft_qlora tokens/s. Not measured (ratio
    and met None) when both were ``requested`` but one has no row (it failed); nothing when not both
    were run or asked for."""
    by_name = {r["variant"]: r for r in rows}
    bound = GOALS["qlora_tokens_per_s_vs_peft_min"]
    pair = ("lora_kernels_qlora", "peft_qlora")
    if all(v in by_name for v in pair):
        row = by_name["lora_kernels_qlora"]
        return [goal_check("qlora_tokens_per_s_vs_peft", row.get("shape"), row["speedup_vs_peft"], min=bound)]
    if all(v in requested for v in pair):
        shape = next((r.get("shape") for r in rows), None)
        return [goal_check("qlora_tokens_per_s_vs_peft", shape, None, min=bound)]
    return []


# ----------------------------------------------------------------------------- driver

def run(device=None, dtype=None, preset=None, steps=None, warmup_steps=None, batch=None, seq=None,
        variants=tuple(VARIANTS), dropout=0.0, r=16, lr=1e-4, seed=0, out=None, plot=True, verbose=True,
        dora=False) -> dict:
    """Trains every variant in ``variants`` for ``warmup_steps`` + ``steps`` AdamW steps on input_ids
    [batch, seq] of ``preset`` (``dora``: with DoRA adapters, PEFT's ``use_dora=True``) and writes
    train_<dtype>[_dora].{json,csv,png} under ``out`` (default
    ``benchmarks/results/<device-kind>/``). Defaults: CPU tiny/fp32, batch 2, seq 64, 5 steps, 1
    warm-up; CUDA 1b/bf16, batch 4, seq 1024, 20 steps, 3 warm-ups. LoRA rank ``r`` with alpha = 2r
    on the seven projections. Returns the results dict (metadata, config, rows, skipped, goals)."""
    from lora_kernels.tools.models import PRESETS, TARGETS

    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch float dtype, got {dtype!r}")
    if dtype is not None and not isinstance(dtype, (str, torch.dtype)):
        raise TypeError(f"dtype must be a str or torch.dtype, got {type(dtype).__name__}")
    if isinstance(dtype, torch.dtype) and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    device, dtype = resolve_device_dtype(device, dtype)
    cuda = device.type == "cuda"
    defaults = CUDA_DEFAULTS if cuda else CPU_DEFAULTS
    preset = defaults["preset"] if preset is None else preset
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    steps = _check_int("steps", defaults["steps"] if steps is None else steps, 1)
    warmup_steps = _check_int("warmup_steps", defaults["warmup_steps"] if warmup_steps is None else warmup_steps, 0)
    batch = _check_int("batch", defaults["batch"] if batch is None else batch, 1)
    # seq >= 2: the causal LM loss predicts token t+1 from t, so one token gives no loss term.
    seq = _check_int("seq", defaults["seq"] if seq is None else seq, 2)
    r = _check_int("r", r, 1)
    seed = _check_int("seed", seed, 0)
    lr = _check_float("lr", lr, 0.0, math.inf, low_open=True, high_open=True)
    dropout = _check_float("dropout", dropout, 0.0, 1.0, low_open=False, high_open=True)
    if not isinstance(dora, bool):
        raise TypeError(f"dora must be a bool, got {type(dora).__name__}")
    variants, skipped = available_variants(_check_variants(variants), device)
    out = Path(out) if out is not None else default_out_dir(device)

    from lora_kernels.ops import select_backend

    hidden = PRESETS[preset]["hidden_size"]
    raw = {}
    for name in variants:
        train = functools.partial(train_variant, name, preset=preset, device=device, dtype=dtype, batch=batch,
                                  seq=seq, steps=steps, warmup_steps=warmup_steps, lr=lr, dropout=dropout, r=r,
                                  seed=seed, dora=dora)
        for variable, value in OPT_IN_VARIANTS.get(name, (None, None, {}))[2].items():
            train = with_env(variable, value, train)
        try:
            raw[name] = train()
        except Exception as e:  # report a failing variant (e.g. out of memory) and measure the others
            err = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            warnings.warn(f"{name} failed: {err}")
            skipped[name] = err
        free_memory(device)
    rows = make_rows(raw, batch, seq)
    shape = f"{preset} {batch}x{seq}"
    for row in rows:
        row["shape"] = shape
    result = {
        "metadata": environment_metadata(device, dtype),
        "config": {
            "preset": preset, "model": dict(PRESETS[preset]), "batch": batch, "seq": seq,
            "tokens_per_step": batch * seq, "steps": steps, "warmup_steps": warmup_steps,
            "optimizer": "AdamW", "lr": lr, "r": r, "lora_alpha": 2 * r, "dropout": dropout, "dora": dora,
            "targets": list(TARGETS), "seed": seed, "batch_seeds": "seed + 1 + step (step 0 = first warm-up)",
            "labels": "input_ids (causal LM loss)", "variants": list(variants), "statistic": "median",
            "timing": "synchronize + perf_counter around zero_grad, forward, backward, optimizer step",
            "peak": "CUDA max_memory_allocated over the timed steps (None on CPU)",
            "lora_kernels_backend": select_backend(device, batch * seq, hidden, hidden, r, small_m_torch=dropout == 0),
        },
        "rows": rows,
        "skipped": skipped,
        # the issue's goal is for plain QLoRA: not checked on DoRA runs
        "goals": {"bounds": GOALS, "checks": [] if dora else check_goals(rows, variants), "device_type": device.type},
    }
    stem = f"train_{result['metadata']['dtype']}{'_dora' if dora else ''}"
    write_outputs(result, out, stem, TRAIN_CSV_FIELDS, _plot if plot else None)
    if verbose:
        print(format_table(rows, result["metadata"], result["config"]))
        print(format_losses(rows, warmup_steps))
        print(format_goals("goals (lora_kernels_qlora and peft_qlora tokens/s)", result["goals"]))
        for name, err in skipped.items():
            print(f"skipped {name}: {err}")
        print(f"wrote {out}/{stem}.{{json,csv,png}}")
    return result


# ----------------------------------------------------------------------------- output

def format_table(rows, meta, config) -> str:
    """Fixed-width text table of the rows (ms, tokens/s, MiB; ratios against the family's PEFT row);
    without a GPU, the speed-up over PEFT and no times."""
    absolute = absolute_times(meta)
    lines = [f"{meta['device']}  {meta['dtype']}  torch {meta['torch']}  peft {meta['peft']}  "
             f"bitsandbytes {meta['bitsandbytes']}" + ("" if absolute else "  (no GPU: speed as ratios only)"),
             f"preset {config['preset']}, batch {config['batch']} x seq {config['seq']}, {config['steps']} timed steps "
             f"after {config['warmup_steps']} warm-up, r={config['r']}{' DoRA' if config.get('dora') else ''}, "
             f"dropout {config['dropout']:g}, "
             f"lora_kernels backend {config['lora_kernels_backend']}",
             f"{'variant':<23}" + (f"{'step ms':>9}{'tokens/s':>11}" if absolute else "")
             + f"{'x peft':>8}{'peak MiB':>10}{'x peft':>8}"
             f"{'max |dloss|':>13}{'1st |dloss|':>13}{'GPU busy':>9}  paths (step 1)"]
    for r in rows:
        paths = ", ".join(f"{k} {v}" for k, v in r["first_step_paths"].items()) or "-"
        lines.append(f"{r['variant']:<23}" + (f"{r['median_step_ms']:9.2f}{r['tokens_per_s']:11.1f}" if absolute else "")
                     + f"{fmt_num(r['speedup_vs_peft'], '8.3f')}{fmt_num(mib(r['peak_bytes']), '10.1f')}"
                     f"{fmt_num(r['peak_ratio_vs_peft'], '8.3f')}{fmt_num(r['max_loss_diff_vs_peft'], '13.2e')}"
                     f"{fmt_num(r['first_loss_diff_vs_peft'], '13.2e')}{fmt_num(r.get('gpu_busy_fraction'), '9.2f')}"
                     f"  {paths}")
    return "\n".join(lines + format_kernel_kinds(rows))


def format_kernel_kinds(rows) -> list:
    """Lines of a table of the profiled step's GPU kernel time by kind (ms), one line per row that has
    it, and each such row's most expensive kernel; no lines where nothing was profiled (CPU)."""
    rows = [r for r in rows if r.get(f"gpu_ms_{OURS}") is not None]
    if not rows:
        return []
    lines = ["GPU kernel ms of one profiled step, by kind",
             f"{'variant':<23}" + "".join(f"{name:>14}" for name in CATEGORY_NAMES) + f"{'total':>10}"]
    for r in rows:
        lines.append(f"{r['variant']:<23}" + "".join(f"{r[f'gpu_ms_{name}']:14.2f}" for name in CATEGORY_NAMES)
                     + fmt_num(r.get("gpu_kernel_ms"), "10.2f"))
    for r in rows:
        top = (r.get("top_kernels") or [{}])[0]
        if top:
            lines.append(f"  {r['variant']}: most time in {top['name'][:90]} ({top['category']}, "
                         f"{top['ms']:.2f} ms in {top['calls']} calls)")
    return lines


def format_losses(rows, warmup_steps: int) -> str:
    """Side-by-side losses: one line per step (warm-up steps marked w), one column per variant."""
    if not rows:
        return "no losses (no variant ran)"
    width = max(14, max(len(r["variant"]) for r in rows) + 2)
    lines = ["loss per step", f"{'step':>6}" + "".join(f"{r['variant']:>{width}}" for r in rows)]
    for i in range(max(len(r["losses"]) for r in rows)):
        label = f"{i + 1}{'w' if i < warmup_steps else ''}"
        lines.append(f"{label:>6}" + "".join(
            f"{r['losses'][i]:>{width}.6f}" if i < len(r["losses"]) else f"{'-':>{width}}" for r in rows))
    return "\n".join(lines)


def _plot(result, path):
    import matplotlib.pyplot as plt

    rows = result["rows"]
    cfg, meta = result["config"], result["metadata"]
    fig, (ax_tok, ax_loss, ax_diff) = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {"dense": "tab:blue", "qlora": "tab:orange"}
    xs = range(len(rows))
    absolute = absolute_times(meta)  # else speed-ups only: no absolute speed from a CPU
    heights = [r["tokens_per_s"] if absolute else (r["speedup_vs_peft"] or 0.0) for r in rows]
    bars = ax_tok.bar(xs, heights, color=[colors[r["family"]] for r in rows])
    for bar, r in zip(bars, rows):
        if r["speedup_vs_peft"] is not None:
            ax_tok.annotate(f"{r['speedup_vs_peft']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax_tok.set_xticks(list(xs))
    ax_tok.set_xticklabels([r["variant"] for r in rows], rotation=30, ha="right", fontsize=7)
    ax_tok.set_ylabel("tokens/s (median step; label: x PEFT of its family)" if absolute
                      else "speed-up vs PEFT of its family (median step)")
    losses = {r["variant"]: r["losses"] for r in rows}
    for r in rows:
        steps = range(1, len(r["losses"]) + 1)
        style = "--" if r["variant"].startswith("peft") else "-"
        ax_loss.plot(steps, r["losses"], style, marker="o", ms=3, label=r["variant"])
        ref = losses.get(r["peft_ref"]) if r["peft_ref"] != r["variant"] else None
        if ref:
            ax_diff.plot(steps[:len(ref)], [a - b for a, b in zip(r["losses"], ref)], marker="o", ms=3,
                         label=f"{r['variant']} - {r['peft_ref']}")
    for ax in (ax_loss, ax_diff):
        if cfg["warmup_steps"]:
            ax.axvline(cfg["warmup_steps"] + 0.5, color="k", lw=0.8, ls=":")
        ax.set_xlabel(f"step (first {cfg['warmup_steps']} untimed warm-up)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax_loss.set_ylabel("training loss")
    ax_diff.axhline(0.0, color="k", lw=0.8)
    ax_diff.set_ylabel("loss - loss of its family's PEFT row")
    fig.suptitle(f"training steps, {cfg['preset']} {cfg['batch']}x{cfg['seq']}, r={cfg['r']}, "
                 f"{meta['device']}, {meta['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI

def _variant_list(text: str) -> list:
    return [v for v in text.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser):
    """Training benchmark CLI options. --device, --dtype, --out and --no-plot have bench's meaning and
    are added only when ``parser`` does not define them already (so these options can join bench's
    parser; bench's --rank is a list, so the LoRA rank here is --r)."""
    common = [("--device", dict(default=None, help="cpu or cuda[:i] (default: cuda if present)")),
              ("--dtype", dict(default=None, choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")),
              ("--out", dict(type=Path, default=None, help="output dir (default benchmarks/results/<device-kind>/)")),
              ("--no-plot", dict(action="store_true", help="write JSON and CSV only"))]
    for flag, kwargs in common:
        try:
            parser.add_argument(flag, **kwargs)
        except argparse.ArgumentError:  # already defined by the parser this joins (bench's)
            pass
    parser.add_argument("--preset", default=None, help="built-in model: tiny, facts, 1b (default 1b CUDA, tiny CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 20 CUDA, 5 CPU)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed steps first (default 3 CUDA, 1 CPU)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 4 CUDA, 2 CPU)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024 CUDA, 64 CPU)")
    parser.add_argument("--variants", type=_variant_list, default=list(VARIANTS),
                        help=f"comma-separated subset of {','.join(ALL_VARIANTS)} (default: the first "
                             f"{len(VARIANTS)}; the others are opt-in routes, CUDA only)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0: losses comparable)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2r; default 16)")
    parser.add_argument("--seed", type=int, default=0, help="weights, adapters and batches seed (default 0)")
    parser.add_argument("--dora", action="store_true", help="DoRA adapters (PEFT use_dora=True) instead of LoRA")


def run_from_args(args) -> dict:
    return run(device=args.device, dtype=args.dtype, preset=args.preset, steps=args.steps,
               warmup_steps=args.warmup_steps, batch=args.batch, seq=args.seq, variants=args.variants,
               dropout=args.dropout, r=args.r, lr=args.lr, seed=args.seed, out=args.out,
               plot=not getattr(args, "no_plot", False), dora=args.dora)


def main(argv=None) -> dict:
    return standalone_main(__doc__, add_arguments, run_from_args, argv)


if __name__ == "__main__":
    main()
