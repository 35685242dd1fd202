"""Memory profile: a whole model (default) or one LoRA linear layer (``--layer``).

Model mode (``run_model``): a built-in Llama-style model (``lora_kernels.tools.models``: random init
from a transformers config, nothing downloaded; preset ``tiny`` on CPU, ``1b`` on a GPU) with LoRA
on the seven projections, as PEFT builds it and patched by lora_kernels (A trainable, and LoRA-FA
with A frozen), dense and QLoRA (bitsandbytes NF4 base, when bitsandbytes imports), for each
dropout p. Per variant: the saved activations of one training step (``profile_memory``: exact,
per module, storage-deduplicated, parameters excluded), aggregated by module kind
(``MODULE_KINDS``) and per decoder layer, its ratio to the PEFT model with the same base and
dropout, and on CUDA the peak allocated bytes of a steady-state training step (forward, backward
and AdamW over the LoRA parameters, after one warm-up step). Writes memory_model_<dtype>.*.

Layer mode (``run_layer``; same implementations as ``bench``):
(a) Saved activations of one training forward, via ``torch.autograd.graph.saved_tensors_hooks``:
    bytes and count of the tensors autograd keeps for backward, de-duplicated by storage and
    excluding parameters (the frozen weight and the adapters are stored anyway). x counts: the
    graph keeps it alive. Bytes are whole storages, so a saved view costs what it pins.
(b) On CUDA also the peak ``max_memory_allocated`` increase over one fwd+bwd (outputs and
    gradients included) and the memory still held after the forward (y + saved tensors).
Each is measured without dropout and with dropout (default p = 0.1): PEFT keeps the dropped copy
of x and its mask, lora_kernels keeps an 8-byte seed and regenerates the mask.
Writes memory_<dtype>.*.
"""
import argparse
import os
import re
import warnings
from pathlib import Path

import torch

from lora_kernels.tools.bench import (ALL_IMPLS, add_common_arguments, available_impls, build_impls,
                                      default_out_dir, environment_metadata, make_problem, probe,
                                      resolve_device_dtype, write_outputs, fmt_num, mib, standalone_main)
from lora_kernels.tools.profile import OUTSIDE, SavedStorages, profile_memory, storage_keys

CPU_SHAPES = [(2048, 1024, 1024, 16)]
CUDA_SHAPES = [(8192, 4096, 4096, 16)]
MEMORY_CSV_FIELDS = ["shape", "impl", "dropout_p", "activation_bytes", "activation_count",
                     "activation_vs_x", "peak_fwdbwd_bytes", "fwd_retained_bytes"]


# ----------------------------------------------------------------------------- layer mode

def saved_activations(impl) -> tuple:
    """(bytes, count) of the non-parameter storages one ``impl.forward()`` saves for backward."""
    # Parameters are stored regardless of the graph; an aliasing view of one costs nothing.
    saved = SavedStorages(storage_keys(impl.params))
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        y = impl.forward()
    del y
    return saved.total_bytes, saved.total_count


def cuda_peak(impl, dy: torch.Tensor) -> tuple:
    """(peak fwd+bwd bytes above the starting allocation, bytes still held after the forward)."""
    dev = dy.device
    for t in impl.leaves:
        t.grad = None
    torch.cuda.synchronize(dev)
    start = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    y = impl.forward()
    torch.cuda.synchronize(dev)
    retained = torch.cuda.memory_allocated(dev) - start
    impl.backward(y, dy)  # inside the provider's settings (its route's environment), as its forward
    del y
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - start
    for t in impl.leaves:
        t.grad = None
    return peak, retained


def run_layer(shapes=None, device=None, dtype=None, dropouts=(0.0, 0.1), out=None, impls=ALL_IMPLS,
              plot=True, verbose=True) -> dict:
    """Profiles every (M, K, N, r) in ``shapes`` (x [M, K], weight [N, K], rank r) for each dropout
    p; writes memory_<dtype>.{json,csv,png} under ``out``. Returns the results dict."""
    device, dtype = resolve_device_dtype(device, dtype)
    cuda = device.type == "cuda"
    shapes = shapes or (CUDA_SHAPES if cuda else CPU_SHAPES)
    out = Path(out) if out is not None else default_out_dir(device)
    impls = available_impls(impls)
    itemsize = torch.empty(0, dtype=dtype).element_size()

    rows, errors = [], {}
    for (M, K, N, r) in shapes:
        shape = f"{M},{K},{N},{r}"
        for p in dropouts:
            prob = make_problem(M, K, N, r, device, dtype)
            built = build_impls(prob, impls, dropout_p=p)
            dy = torch.randn(M, N, device=device, dtype=dtype)
            for name, impl in built.items():
                nbytes, count = saved_activations(impl)
                peak = retained = None
                if cuda:
                    # The probe doubles as warmup: workspaces and autotuning allocate only once.
                    err = probe(impl, dy)
                    if err is None:
                        peak, retained = cuda_peak(impl, dy)
                    else:
                        errors.setdefault(shape, {})[f"{name}@p={p}"] = err
                rows.append({"shape": shape, "M": M, "K": K, "N": N, "r": r, "impl": name,
                             "dropout_p": p, "activation_bytes": nbytes, "activation_count": count,
                             "activation_mib": nbytes / 2 ** 20,
                             "activation_vs_x": nbytes / (M * K * itemsize),
                             "peak_fwdbwd_bytes": peak, "fwd_retained_bytes": retained})
            del built, prob, dy
    result = {"metadata": environment_metadata(device, dtype),
              "config": {"dropouts": list(dropouts), "impls": list(impls),
                         "activation_bytes": "saved tensors, storage-deduplicated, parameters excluded"},
              "rows": rows, "errors": errors}
    stem = f"memory_{result['metadata']['dtype']}"
    write_outputs(result, out, stem, MEMORY_CSV_FIELDS, _plot_layer_memory if plot else None)
    if verbose:
        print(format_layer_table(rows, result["metadata"]))
        print(f"wrote {out}/{stem}.{{json,csv,png}}")
    return result


def format_layer_table(rows, meta) -> str:
    """Fixed-width text table of memory rows (MiB)."""
    lines = [f"{meta['device']}  {meta['dtype']}  torch {meta['torch']}  peft {meta['peft']}",
             f"{'shape M,K,N,r':<22}{'impl':<17}{'p':>5}{'saved MiB':>11}{'#':>4}{'/ x':>7}"
             f"{'peak MiB':>10}"]
    for r in rows:
        lines.append(f"{r['shape']:<22}{r['impl']:<17}{r['dropout_p']:>5.2f}"
                     f"{fmt_num(mib(r['activation_bytes']), '11.3f')}{r['activation_count']:>4d}"
                     f"{fmt_num(r['activation_vs_x'], '7.3f')}{fmt_num(mib(r['peak_fwdbwd_bytes']), '10.1f')}")
    return "\n".join(lines)


def _plot_layer_memory(result, path):
    import matplotlib.pyplot as plt

    rows = result["rows"]
    groups = list(dict.fromkeys((r["shape"], r["dropout_p"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    metrics = [("activation_bytes", "saved activations (MiB)")]
    if any(r["peak_fwdbwd_bytes"] is not None for r in rows):
        metrics.append(("peak_fwdbwd_bytes", "peak fwd+bwd increase (MiB)"))
    width = 0.8 / max(len(impls), 1)
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(6, 2.5 * len(groups) + 2) * len(metrics), 4),
                             squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        for j, impl in enumerate(impls):
            vals = [next(((r[key] or 0) / 2 ** 20 for r in rows
                          if (r["shape"], r["dropout_p"]) == g and r["impl"] == impl), 0) for g in groups]
            ax.bar([i + j * width for i in range(len(groups))], vals, width, label=impl)
        ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(groups))])
        ax.set_xticklabels([f"{s}\np={p}" for s, p in groups], fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    meta = result["metadata"]
    fig.suptitle(f"LoRA linear memory, {meta['device']}, {meta['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- model mode

# (batch, seq) per preset: tiny is the CPU default, 1b the GPU default; facts is FACTS.md's model.
MODEL_BATCH = {"tiny": (2, 128), "facts": (4, 256), "1b": (4, 1024)}
MODULE_KINDS = ("embedding", "attn_proj", "attn_core", "mlp_proj", "mlp_act", "norm", "head_loss", "other")
MODULE_KIND_DOC = {
    "embedding": "embed_tokens",
    "attn_proj": "q/k/v/o_proj LoRA layers (base linear, dropout, lora_A, lora_B, fused op)",
    "attn_core": "rest of self_attn: RoPE, attention (SDPA), reshapes",
    "mlp_proj": "gate/up/down_proj LoRA layers",
    "mlp_act": "rest of the MLP: SiLU and the gate * up product",
    "norm": "RMSNorms",
    "head_loss": "lm_head, the loss (computed in the *ForCausalLM forward) and the PEFT wrappers",
    "other": "anything else (decoder layer, rotary table, ...)",
}
_ATTN_PROJ = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP_PROJ = {"gate_proj", "up_proj", "down_proj"}
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
MODEL_CSV_FIELDS = ["label", "preset", "variant", "qlora", "dropout_p", "batch", "seq", "saved_bytes",
                    "saved_count", "ratio_vs_peft", "peak_bytes", "baseline_bytes", "peak_ratio_vs_peft",
                    *(f"{k}_bytes" for k in MODULE_KINDS)]


def module_kind(name: str, module_class: str = "") -> str:
    """Kind (one of ``MODULE_KINDS``) of the module ``name`` (qualified, in a PEFT Llama model)."""
    parts = name.split(".") if name else []
    if _ATTN_PROJ.intersection(parts):
        return "attn_proj"
    if _MLP_PROJ.intersection(parts):
        return "mlp_proj"
    last = parts[-1] if parts else ""
    if "embed" in last:
        return "embedding"
    if "norm" in last.lower():
        return "norm"
    if "mlp" in parts:
        return "mlp_act"
    if "self_attn" in parts:
        return "attn_core"
    if (last == "lm_head" or name in ("", OUTSIDE) or module_class.endswith("ForCausalLM")
            or module_class in ("LoraModel", "PeftModel")):
        return "head_loss"
    return "other"


def layer_index(name: str):
    """Decoder layer index of a qualified module name (``...layers.<i>...``), or None."""
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def profile_variant(spec, device, dtype, batch: int, seq: int, seed: int = 0) -> dict:
    """Builds ``spec`` (a ``models.ModelSpec``), profiles one training step on a random batch
    (input_ids = labels [batch, seq]) and returns the row (without ``ratio_vs_peft``)."""
    from lora_kernels.tools import models

    model = models.build_lora_model(spec, device, dtype, seed)
    ids = models.random_batch(spec.preset, batch, seq, device, seed=seed + 1)
    inputs = {"input_ids": ids, "labels": ids}
    opt = torch.optim.AdamW(models.lora_parameters(model), lr=1e-4)
    if device.type == "cuda":
        # Warm-up step: Triton autotuning, cuBLAS workspaces and AdamW's state are allocated once,
        # so the profiled step is a steady-state training step.
        model(**inputs).loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    prof = profile_memory(model, inputs, step=opt)
    kinds = dict.fromkeys(MODULE_KINDS, 0)
    for kind, nbytes in prof.grouped(lambda m: module_kind(m.name, m.module_class)).items():
        kinds[kind] += nbytes
    n_layers = models.PRESETS[spec.preset]["num_hidden_layers"]
    layers = [0] * n_layers
    for m in prof.per_module:
        i = layer_index(m.name)
        if i is not None:
            layers[i] += m.saved_bytes
    row = {"label": spec.label, "preset": spec.preset, "variant": spec.variant, "qlora": spec.qlora,
           "dropout_p": spec.dropout, "r": spec.r, "alpha": spec.alpha, "batch": batch, "seq": seq,
           "saved_bytes": prof.total_saved_bytes, "saved_mib": prof.total_saved_bytes / 2 ** 20,
           "saved_count": prof.saved_count, "ratio_vs_peft": None,
           "peak_bytes": prof.peak_bytes, "baseline_bytes": prof.baseline_bytes,
           "peak_increase_bytes": prof.peak_increase_bytes, "peak_ratio_vs_peft": None,
           "loss": prof.loss, "trainable_param_bytes": models.param_bytes(model, trainable=True),
           "frozen_param_bytes": models.param_bytes(model, trainable=False),
           **{f"{k}_bytes": v for k, v in kinds.items()},
           "layer_saved_bytes": layers,
           # Full detail for decoder layer 0 and everything outside the decoder layers (the other
           # layers repeat layer 1's pattern: see layer_saved_bytes).
           "per_module": [{**vars(m), "kind": module_kind(m.name, m.module_class)} for m in prof.per_module
                          if layer_index(m.name) in (None, 0)]}
    del model, opt, prof, inputs, ids
    return row


def run_model(preset=None, device=None, dtype=None, batch=None, seq=None, dropouts=(0.0, 0.1),
              variants=None, qlora=None, r: int = 16, alpha: int = 32, out=None, seed: int = 0,
              plot=True, verbose=True, dora: bool = False) -> dict:
    """Profiles the built-in ``preset`` model (default ``models.default_preset(device)``) for every
    variant (default ``models.VARIANTS``: peft, lora_kernels, lora_kernels_fa) x dense/QLoRA x
    dropout p, on input_ids = labels [batch, seq] (defaults ``MODEL_BATCH[preset]``).
    ``qlora``: None = dense, plus QLoRA when bitsandbytes imports; False = dense only; True = both.
    ``dora``: DoRA adapters (PEFT's ``use_dora=True``) instead of plain LoRA.
    Writes memory_model_<dtype>[_dora].{json,csv,png} under ``out``; returns the results dict."""
    from lora_kernels.ops import CPU_BACKEND_ENV
    from lora_kernels.tools import models

    device, dtype = resolve_device_dtype(device, dtype)
    cuda = device.type == "cuda"
    preset = preset or models.default_preset(device)
    if preset not in models.PRESETS:
        raise ValueError(f"preset must be one of {sorted(models.PRESETS)}, got {preset!r}")
    default_batch, default_seq = MODEL_BATCH.get(preset, (2, 128))
    batch = default_batch if batch is None else batch
    seq = default_seq if seq is None else seq
    for arg, value, least in (("batch", batch, 1), ("seq", seq, 2), ("r", r, 1)):
        if not isinstance(value, int) or value < least:  # seq 1: no next token to predict (the loss is NaN)
            raise ValueError(f"{arg} must be an int >= {least}, got {value!r}")
    variants = list(models.VARIANTS if variants is None else variants)
    unknown = [v for v in variants if v not in models.VARIANTS]
    if unknown or not variants:
        raise ValueError(f"variants must be a non-empty subset of {models.VARIANTS}, got {variants!r}")
    dropouts = list(dropouts)
    if not dropouts or any(not 0.0 <= p < 1.0 for p in dropouts):
        raise ValueError(f"dropouts must be a non-empty list of probabilities in [0, 1), got {dropouts!r}")
    if qlora not in (None, False, True):
        raise ValueError(f"qlora must be None, False or True, got {qlora!r}")
    if not isinstance(dora, bool):
        raise TypeError(f"dora must be a bool, got {type(dora).__name__}")
    out = Path(out) if out is not None else default_out_dir(device)
    qloras = [False]
    if qlora or (qlora is None and models.bitsandbytes_importable()):
        qloras.append(True)
    elif qlora is None:
        warnings.warn("bitsandbytes does not import: no QLoRA rows")

    rows, errors = [], {}
    for q in qloras:
        for p in dropouts:
            for variant in variants:
                spec = models.ModelSpec(preset, variant, qlora=q, dropout=p, r=r, alpha=alpha, dora=dora)
                try:
                    rows.append(profile_variant(spec, device, dtype, batch, seq, seed))
                except Exception as e:  # report a failing variant (e.g. OOM, a bnb build without CUDA), go on
                    errors[spec.label] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                    warnings.warn(f"{spec.label} failed: {errors[spec.label]}")
                models.free_memory(device)
                if verbose:
                    print(f"  profiled {spec.label}", flush=True)
    for row in rows:
        ref = next((x for x in rows if x["variant"] == "peft" and x["qlora"] == row["qlora"]
                    and x["dropout_p"] == row["dropout_p"]), None)
        if ref is not None:
            row["ratio_vs_peft"] = row["saved_bytes"] / ref["saved_bytes"] if ref["saved_bytes"] else None
            if row["peak_bytes"] is not None and ref["peak_bytes"]:
                row["peak_ratio_vs_peft"] = row["peak_bytes"] / ref["peak_bytes"]

    result = {"metadata": environment_metadata(device, dtype),
              "config": {"mode": "model", "preset": preset, "llama_config": models.PRESETS[preset],
                         "batch": batch, "seq": seq, "tokens": batch * seq, "r": r, "alpha": alpha, "dora": dora,
                         "targets": list(models.TARGETS), "variants": variants, "dropouts": dropouts,
                         "qlora": qloras, "seed": seed, "inputs": "input_ids = labels, uniform random",
                         "loss": "out.loss (causal LM cross-entropy, computed by the model)",
                         "cpu_backend": os.environ.get(CPU_BACKEND_ENV, "auto") if not cuda else None,
                         "saved_bytes": "tensors autograd saves in one training forward (incl. the loss), "
                                        "unique storages, parameters/buffers/quant states excluded, "
                                        "attributed to the innermost running module",
                         "peak_bytes": ("CUDA max_memory_allocated over fwd + bwd + AdamW step (LoRA params), "
                                        "after one warm-up step; baseline_bytes = allocated before the step")
                         if cuda else None,
                         "module_kinds": MODULE_KIND_DOC,
                         "per_module": "decoder layer 0 and modules outside the decoder layers only; "
                                       "layer_saved_bytes has every layer's total"},
              "rows": rows, "errors": errors}
    stem = f"memory_model_{result['metadata']['dtype']}{'_dora' if dora else ''}"
    write_outputs(result, out, stem, MODEL_CSV_FIELDS, _plot_model_memory if plot else None)
    if verbose:
        print(format_model_table(rows, result["metadata"], result["config"]))
        for label, err in errors.items():
            print(f"FAILED {label}: {err}")
        print(f"wrote {out}/{stem}.{{json,csv,png}}")
    return result


def format_model_table(rows, meta, config) -> str:
    """Fixed-width text table of model-mode rows (MiB)."""
    short = {"embedding": "embed", "attn_proj": "attnproj", "attn_core": "attncore", "mlp_proj": "mlpproj",
             "mlp_act": "mlpact", "norm": "norm", "head_loss": "head+loss", "other": "other"}
    lines = [f"{meta['device']}  {meta['dtype']}  torch {meta['torch']}  peft {meta['peft']}  "
             f"bitsandbytes {meta['bitsandbytes']}",
             f"model {config['preset']}, batch {config['batch']} x seq {config['seq']}, r {config['r']}; "
             "saved activations per module kind (MiB)",
             f"{'variant':<31}{'saved MiB':>10}{'x peft':>8}{'#':>5}{'peak MiB':>10}"
             + "".join(f"{short[k]:>10}" for k in MODULE_KINDS)]
    for r in rows:
        lines.append(f"{r['label']:<31}{fmt_num(mib(r['saved_bytes']), '10.3f')}"
                     f"{fmt_num(r['ratio_vs_peft'], '8.3f')}{r['saved_count']:>5d}"
                     f"{fmt_num(mib(r['peak_bytes']), '10.1f')}"
                     + "".join(fmt_num(mib(r[f'{k}_bytes']), '10.3f') for k in MODULE_KINDS))
    return "\n".join(lines)


def _plot_model_memory(result, path):
    """Stacked bars (saved MiB by module kind) per variant, grouped by dropout; one panel for the
    dense and one for the QLoRA models; a second row with the CUDA peak when measured."""
    import matplotlib.pyplot as plt

    rows = result["rows"]
    qloras = list(dict.fromkeys(r["qlora"] for r in rows))
    has_peak = any(r["peak_bytes"] is not None for r in rows)
    n_rows = 2 if has_peak else 1
    fig, axes = plt.subplots(n_rows, max(len(qloras), 1), figsize=(6.5 * max(len(qloras), 1), 4.2 * n_rows),
                             squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for col, q in enumerate(qloras):
        sub = [r for r in rows if r["qlora"] == q]
        dropouts = list(dict.fromkeys(r["dropout_p"] for r in sub))
        variants = list(dict.fromkeys(r["variant"] for r in sub))
        xs, labels, bars = [], [], []
        for g, p in enumerate(dropouts):
            for j, v in enumerate(variants):
                r = next((r for r in sub if r["dropout_p"] == p and r["variant"] == v), None)
                if r is not None:
                    xs.append(g * (len(variants) + 1) + j)
                    labels.append(f"{v.replace('lora_kernels', 'ours')}\np={p:g}")
                    bars.append(r)
        ax = axes[0][col]
        bottom = [0.0] * len(bars)
        for k, kind in enumerate(MODULE_KINDS):
            vals = [r[f"{kind}_bytes"] / 2 ** 20 for r in bars]
            ax.bar(xs, vals, 0.8, bottom=bottom, label=kind, color=colors[k % len(colors)])
            bottom = [b + v for b, v in zip(bottom, vals)]
        for x, top, r in zip(xs, bottom, bars):
            if r["ratio_vs_peft"] is not None:
                ax.text(x, top, f"{r['ratio_vs_peft']:.2f}x", ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, max(bottom + [1e-3]) * 1.15)  # room for the ratio labels
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("saved activations (MiB)")
        ax.set_title("QLoRA (NF4 base)" if q else "dense base", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
        if has_peak:
            ax = axes[1][col]
            ax.bar(xs, [(r["peak_bytes"] or 0) / 2 ** 20 for r in bars], 0.8, color="gray")
            ax.set_xticks(xs)
            ax.set_xticklabels(labels, fontsize=7)
            ax.set_ylabel("peak allocated, fwd+bwd+AdamW (MiB)")
    meta, cfg = result["metadata"], result["config"]
    fig.suptitle(f"LoRA model memory: {cfg['preset']}, batch {cfg['batch']} x seq {cfg['seq']}, r {cfg['r']}, "
                 f"{meta['device']}, {meta['dtype']} (labels: x PEFT)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(device=None, dtype=None, out=None, *, layer: bool = False, **kwargs) -> dict:
    """``python -m lora_kernels all``'s entry: the model profile (``run_model``), or the layer
    profile (``run_layer``) with ``layer=True``; other keyword arguments go to that function."""
    return (run_layer if layer else run_model)(device=device, dtype=dtype, out=out, **kwargs)


# ----------------------------------------------------------------------------- CLI

def _int_list(text):
    return [int(v) for v in text.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser):
    """Memory CLI options (model mode by default, ``--layer`` for one layer)."""
    add_common_arguments(parser)  # --shapes and --impls apply to --layer only
    parser.add_argument("--dropout", type=lambda s: [float(v) for v in s.split(",") if v],
                        default=[0.0, 0.1], help="comma-separated dropout probabilities (default 0,0.1)")
    parser.add_argument("--layer", action="store_true",
                        help="profile one LoRA linear layer (--shapes, --impls) instead of a model")
    parser.add_argument("--preset", default=None, help="model preset: tiny, facts, 1b (default: 1b on CUDA, tiny)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per batch (default 4 for 1b, 2 for tiny)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024 for 1b, 128 for tiny)")
    parser.add_argument("--variants", type=lambda s: [v for v in s.split(",") if v], default=None,
                        help="comma-separated subset of peft,lora_kernels,lora_kernels_fa")
    parser.add_argument("--no-qlora", action="store_true", help="dense models only (default: QLoRA too when "
                                                                  "bitsandbytes imports)")
    parser.add_argument("--dora", action="store_true", help="DoRA adapters (PEFT use_dora=True) instead of LoRA")


# the model profile's options, which --layer does not take: (attribute, flag, its default)
_MODEL_ONLY = (("preset", "--preset", None), ("batch", "--batch", None), ("seq", "--seq", None),
               ("variants", "--variants", None), ("no_qlora", "--no-qlora", False), ("dora", "--dora", False))


def run_from_args(args) -> dict:
    if args.layer:
        given = [flag for attr, flag, default in _MODEL_ONLY if getattr(args, attr) != default]
        if given:
            raise ValueError(f"{', '.join(given)} apply to the model profile, not to --layer")
        return run_layer(shapes=args.shapes, device=args.device, dtype=args.dtype, dropouts=args.dropout,
                         out=args.out, impls=args.impls)
    if args.shapes is not None:
        raise ValueError("--shapes applies to the layer profile: add --layer")
    return run_model(preset=args.preset, device=args.device, dtype=args.dtype, batch=args.batch, seq=args.seq,
                     dropouts=args.dropout, variants=args.variants, qlora=False if args.no_qlora else None,
                     out=args.out, dora=args.dora)


def main(argv=None) -> dict:
    return standalone_main(__doc__, add_arguments, run_from_args, argv)


if __name__ == "__main__":
    main()
