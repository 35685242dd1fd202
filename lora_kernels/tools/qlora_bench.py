"""Benchmark of one QLoRA layer (NF4 base weight + LoRA): forward, backward, forward+backward,
inference forward, saved activations and, on CUDA, peak memory.

Implementations, all on the same NF4 bytes (block size 64, double quantization), adapters and x,
timed in the same run (interleaved rep by rep, medians; see ``lora_kernels.tools.bench``):
    lora_kernels_nf4     ``lora_kernels.nf4_lora_linear`` (A and B trainable)
    lora_kernels_nf4_fa  the same with lora_A frozen (LoRA-FA)
    peft_qlora           PEFT ``lora.bnb.Linear4bit`` around a bitsandbytes ``Linear4bit`` holding
                         the same NF4 tensors (what transformers + PEFT build for QLoRA)
    lora_kernels_nf4_gemv  the same with the CUDA C++ decode GEMV forced on for M <= 16 (csrc/; CUDA
                         with the built extension only)
    bnb_matmul_4bit      ``bitsandbytes.matmul_4bit``: the NF4 base matmul alone, no LoRA
    base_dense           ``F.linear(x, W)`` with W = dequant(Q) in x's dtype: the dense (cuBLAS) floor
x requires grad (a hidden layer). "infer" is the forward under ``torch.no_grad()`` with x not
requiring grad: bitsandbytes then takes its 4-bit GEMV for one row.
Ratios are times over the reference's time in the same run (< 1: faster than the reference).
"""
import argparse
import os
import statistics
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_kernels.tools import memory
from lora_kernels.tools.bench import (Impl, add_common_arguments, default_out_dir, environment_metadata,
                                      fmt_num, measure_ceilings, probe, resolve_device_dtype, time_impls,
                                      write_outputs)

QLORA_IMPLS = ("lora_kernels_nf4", "lora_kernels_nf4_fa", "lora_kernels_nf4_gemv", "peft_qlora", "bnb_matmul_4bit",
               "base_dense")
LORA_IMPLS = ("lora_kernels_nf4", "lora_kernels_nf4_fa", "lora_kernels_nf4_gemv", "peft_qlora")  # base + LoRA
NF4_IMPLS = ("lora_kernels_nf4", "lora_kernels_nf4_fa", "lora_kernels_nf4_gemv", "peft_qlora", "bnb_matmul_4bit")
PHASES = ("fwd", "bwd", "fwdbwd", "infer")
RANK = 16
CUDA_M = (1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096, 8192)
CUDA_KN = ((4096, 4096), (4096, 14336), (8192, 28672))
# K a multiple of 64 on CPU: bitsandbytes 0.50's native CPU dequantize mis-scales rows whose
# quantization blocks span two rows when K % 16 == 0 (PEFT's QLoRA forward goes through it).
CPU_M = (1, 16, 256)
CPU_KN = ((512, 512), (1024, 2048))
QLORA_CSV_FIELDS = ["shape", "impl", "fwd_ms", "bwd_ms", "fwdbwd_ms", "infer_ms", "fwd_vs_peft",
                    "fwdbwd_vs_peft", "infer_vs_peft", "fwd_vs_dense", "fwdbwd_vs_dense", "saved_bytes",
                    "peak_fwdbwd_bytes", "out_rel_err", "infer_weight_GBps"]
# Goals of the QLoRA issue, checked on GPU results (times relative to the reference, same run).
GOALS = {
    "nf4_gemm_vs_dense_fwd_max": 1.05,      # M >= 4096: lora_kernels_nf4 fwd / base_dense fwd
    "fwd_vs_peft_max": 1 / 1.3,             # 2 <= M <= 64: lora_kernels_nf4 fwd / peft_qlora fwd
    "fwdbwd_vs_peft_max": 1 / 1.5,          # every M: lora_kernels_nf4 fwd+bwd / peft_qlora fwd+bwd
}


def default_shapes(device: torch.device) -> list:
    """(M, K, N, r) grid: the issue's M x (K, N) grid at r = 16 on CUDA, a small one on CPU."""
    ms, kns = (CUDA_M, CUDA_KN) if device.type == "cuda" else (CPU_M, CPU_KN)
    return [(M, K, N, RANK) for (K, N) in kns for M in ms]


class QLoRAProblem:
    """x [M, K] (requires grad), qweight NF4 [N, K], dense = dequant(qweight) [N, K] in x's dtype,
    lora_A [r, K], lora_B [N, r] (random, not PEFT's zero init), scale = lora_alpha / r = 2."""

    def __init__(self, M: int, K: int, N: int, r: int, device, dtype, seed: int = 0):
        from lora_kernels import NF4Weight

        g = torch.Generator(device="cpu").manual_seed(seed)

        def rand(*shape, std=1.0):
            return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

        self.x = rand(M, K).requires_grad_(True)
        self.qweight = NF4Weight.quantize(rand(N, K, std=K ** -0.5), blocksize=64, double_quant=True)
        self.dense = self.qweight.dequantize(dtype)
        self.lora_A = rand(r, K, std=K ** -0.5).requires_grad_(True)
        self.lora_B = rand(N, r, std=r ** -0.5).requires_grad_(True)
        self.r, self.alpha = r, 2 * r
        self.scale = self.alpha / r

    def quant_tensors(self) -> list:
        q = self.qweight
        return [t for t in (q.packed, q.absmax, q.code, q.absmax_code, q.absmax_scale, q.absmax_offset)
                if t is not None]


def _peft_qlora_layer(p: QLoRAProblem, freeze_A: bool = False):
    """PEFT's ``lora.bnb.Linear4bit`` over a bnb ``Linear4bit`` sharing ``p.qweight``'s tensors."""
    import peft
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    from lora_kernels.integrations.bitsandbytes import linear4bit_from_nf4

    base = linear4bit_from_nf4(p.qweight)
    base.compute_dtype = p.x.dtype
    model = torch.nn.Sequential(base)
    model.is_loaded_in_4bit = True  # what transformers sets: PEFT then wraps in lora.bnb.Linear4bit
    cfg = peft.LoraConfig(r=p.r, lora_alpha=p.alpha, target_modules=["0"], lora_dropout=0.0)
    layer = peft.get_peft_model(model, cfg, autocast_adapter_dtype=False).base_model.model[0]
    if type(layer) is not PeftLinear4bit:
        raise RuntimeError(f"PEFT built {type(layer).__name__}, not lora.bnb.Linear4bit")
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        a.copy_(p.lora_A)
        b.copy_(p.lora_B)
    a.requires_grad_(not freeze_A)
    # Training mode also for inference timing: bitsandbytes' CPU backend repacks the weight in
    # place on the first eval-mode forward, which would change the bytes the other rows share.
    layer.train(True)
    return layer, [a, b]


def build_qlora_impls(p: QLoRAProblem, impls=QLORA_IMPLS) -> dict:
    """name -> Impl for the requested implementation names (see ``QLORA_IMPLS``)."""
    from lora_kernels import nf4_lora_linear

    unknown = set(impls) - set(QLORA_IMPLS)
    if unknown:
        raise ValueError(f"unknown implementations {sorted(unknown)}; choose from {QLORA_IMPLS}")
    x, q, A, B, s, W = p.x, p.qweight, p.lora_A, p.lora_B, p.scale, p.dense
    x_infer, A_frozen = x.detach(), A.detach()
    params = p.quant_tensors() + [W, A, B]
    out = {}
    for name in impls:
        if name in ("lora_kernels_nf4", "lora_kernels_nf4_fa"):
            a = A if name == "lora_kernels_nf4" else A_frozen
            out[name] = Impl(name, lambda a=a: nf4_lora_linear(x, q, a, B, s),
                             [x, B] + ([A] if a is A else []), params,
                             infer=lambda: nf4_lora_linear(x_infer, q, A, B, s))
        elif name == "lora_kernels_nf4_gemv":
            from lora_kernels.ops.nf4_gemv import GEMV_MAX_ROWS, NF4_GEMV_ENV
            fwd = _with_env(NF4_GEMV_ENV, GEMV_MAX_ROWS, lambda: nf4_lora_linear(x, q, A, B, s))
            out[name] = Impl(name, fwd, [x, A, B], params,
                             infer=_with_env(NF4_GEMV_ENV, GEMV_MAX_ROWS, lambda: nf4_lora_linear(x_infer, q, A, B, s)))
        elif name == "peft_qlora":
            layer, adapters = _peft_qlora_layer(p)
            out[name] = Impl(name, lambda layer=layer: layer(x), [x] + adapters, params + adapters,
                             infer=lambda layer=layer: layer(x_infer))
        elif name == "bnb_matmul_4bit":
            import bitsandbytes as bnb

            from lora_kernels.integrations.bitsandbytes import nf4_to_bnb

            weight, state = nf4_to_bnb(q)
            out[name] = Impl(name, lambda: bnb.matmul_4bit(x, weight.data.t(), quant_state=state), [x], params,
                             infer=lambda: bnb.matmul_4bit(x_infer, weight.data.t(), quant_state=state))
        elif name == "base_dense":
            out[name] = Impl(name, lambda: F.linear(x, W), [x], params, infer=lambda: F.linear(x_infer, W))
    return out


def available_qlora_impls(impls) -> list:
    """``impls`` without the rows whose libraries cannot be imported (warns)."""
    impls = list(impls)
    for lib, rows in (("bitsandbytes", ("peft_qlora", "bnb_matmul_4bit")), ("peft", ("peft_qlora",))):
        if any(i in rows for i in impls):
            try:
                __import__(lib)
            except Exception as e:  # any import failure: the other rows are still worth measuring
                warnings.warn(f"{lib} unavailable ({e!r}); skipping {[i for i in impls if i in rows]}")
                impls = [i for i in impls if i not in rows]
    return impls


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def _ratio(a, b):
    return a / b if a is not None and b else None


def check_goals(rows) -> list:
    """The QLoRA issue's goals evaluated on ``rows`` (meaningful on GPU results only): one entry per
    (goal, shape) with the measured ratio, the bound and whether it is met."""
    checks = []
    for r in rows:
        if r["impl"] != "lora_kernels_nf4":
            continue
        cases = [("fwdbwd_vs_peft", r["fwdbwd_vs_peft"], GOALS["fwdbwd_vs_peft_max"])]
        if 2 <= r["M"] <= 64:
            cases.append(("fwd_vs_peft", r["fwd_vs_peft"], GOALS["fwd_vs_peft_max"]))
        if r["M"] >= 4096:
            cases.append(("nf4_gemm_vs_dense_fwd", r["fwd_vs_dense"], GOALS["nf4_gemm_vs_dense_fwd_max"]))
        for goal, value, bound in cases:
            checks.append({"goal": goal, "shape": r["shape"], "ratio": value, "max": bound,
                           "met": value is not None and value <= bound})
    return checks


def run(shapes=None, device=None, dtype=None, reps=None, warmup=None, out=None, impls=QLORA_IMPLS,
        flush_l2=False, plot=True, verbose=True) -> dict:
    """Benchmarks every (M, K, N, r) in ``shapes`` and writes bench_qlora_<dtype>.{json,csv,png}
    under ``out``. Returns the results dict (metadata, ceilings, rows, goal checks)."""
    device, dtype = resolve_device_dtype(device, dtype)
    cuda = device.type == "cuda"
    shapes = shapes or default_shapes(device)
    reps = reps or (30 if cuda else 10)
    warmup = warmup if warmup is not None else (5 if cuda else 2)
    out = Path(out) if out is not None else default_out_dir(device)
    impls = available_qlora_impls(impls)
    from lora_kernels.ops.nf4_gemv import load_extension
    if not (cuda and load_extension()):  # the CUDA GEMV row needs a GPU and the built extension
        impls = [i for i in impls if i != "lora_kernels_nf4_gemv"]

    rows, skipped, formats = [], {}, {}
    for (M, K, N, r) in shapes:
        shape = f"{M},{K},{N},{r}"
        p = QLoRAProblem(M, K, N, r, device, dtype)
        formats[f"{K},{N}"] = {"nf4_bytes": p.qweight.nbytes, "dense_bytes": p.dense.numel() * p.dense.element_size(),
                               "bits_per_parameter": p.qweight.bits_per_parameter}
        built = build_qlora_impls(p, impls)
        dy = torch.randn(M, N, device=device, dtype=dtype)
        for n in list(built):
            err = probe(built[n], dy)
            if err is not None:
                warnings.warn(f"{n} failed at M,K,N,r={shape}: {err}")
                skipped.setdefault(shape, {})[n] = err
                del built[n]
        with torch.no_grad():
            base = F.linear(p.x, p.dense)
            with_lora = base + p.scale * F.linear(F.linear(p.x, p.lora_A), p.lora_B)
            # Guard: every row computes the function it claims (same NF4 bytes, same adapters).
            errs = {n: _rel_err(i.forward(), with_lora if n in LORA_IMPLS else base) for n, i in built.items()}
        times = time_impls(built, dy, reps, warmup, flush_l2, phases=PHASES)
        med = {n: {ph: statistics.median(v) for ph, v in t.items()} for n, t in times.items()}
        for n, impl in built.items():
            saved, _ = memory.saved_activations(impl)
            peak = memory.cuda_peak(impl, dy)[0] if cuda else None
            peft, dense = med.get("peft_qlora", {}), med.get("base_dense", {})
            rows.append({
                "shape": shape, "M": M, "K": K, "N": N, "r": r, "impl": n,
                **{f"{ph}_ms": med[n][ph] for ph in PHASES},
                **{f"{ph}_vs_peft": _ratio(med[n][ph], peft.get(ph)) for ph in ("fwd", "fwdbwd", "infer")},
                **{f"{ph}_vs_dense": _ratio(med[n][ph], dense.get(ph)) for ph in ("fwd", "fwdbwd")},
                "saved_bytes": saved, "peak_fwdbwd_bytes": peak, "out_rel_err": errs[n],
                # weight bytes streamed per inference forward over its time (compare with the copy ceiling)
                "infer_weight_GBps": (p.qweight.nbytes if n in NF4_IMPLS else formats[f"{K},{N}"]["dense_bytes"])
                / (med[n]["infer"] * 1e6),
            })
        del built, p, dy
    ceilings = measure_ceilings(device, dtype)
    result = {
        "metadata": environment_metadata(device, dtype),
        "ceilings": ceilings,
        "config": {"reps": reps, "warmup": warmup, "flush_l2": flush_l2 and cuda, "statistic": "median",
                   "phases": list(PHASES), "impls": list(impls), "scale": 2.0,
                   "nf4": {"blocksize": 64, "double_quant": True}, "ratios": "time / reference time"},
        "formats": formats,
        "rows": rows,
        "skipped": skipped,
        "goals": {"bounds": GOALS, "checks": check_goals(rows), "device_type": device.type},
    }
    stem = f"bench_qlora_{result['metadata']['dtype']}"
    write_outputs(result, out, stem, QLORA_CSV_FIELDS, _plot if plot else None)
    if verbose:
        print(format_table(rows, result["metadata"]))
        print(format_goals(result["goals"]))
        print(f"wrote {out}/{stem}.{{json,csv,png}}")
    return result


# ----------------------------------------------------------------------------- split-K threshold

SWEEP_M = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128)
SPLIT_K_CSV_FIELDS = ["shape", "weight", "M", "split_ms", "no_split_ms", "split_vs_no_split"]


def _with_env(name: str, value, fn):
    """A callable running fn() with environment variable ``name`` set to ``value`` (the dispatch
    overrides of lora_kernels are read per call)."""
    def call():
        old = os.environ.get(name)
        os.environ[name] = str(value)
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old
    return call


def suggest_threshold(rows, weight: str) -> int:
    """Largest swept M such that split-K is no slower at it and at every smaller swept M, for every
    (K, N) (0: split-K never pays)."""
    best = 0
    for M in sorted({r["M"] for r in rows if r["weight"] == weight}):
        ratios = [r["split_vs_no_split"] for r in rows if r["weight"] == weight and r["M"] == M]
        if not ratios or max(ratios) > 1.0:
            break
        best = M
    return best


def split_k_sweep(device=None, dtype=None, ms=SWEEP_M, kns=None, r=RANK, reps=None, warmup=None, out=None,
                  plot=True, verbose=True) -> dict:
    """Inference forward of ``lora_linear`` (dense W) and ``nf4_lora_linear`` with the small-M split-K
    path forced on and off, for each M in ``ms`` and (K, N) in ``kns``; writes
    split_k_<dtype>.{json,csv,png} and suggests ``configs.SMALL_M_MAX`` per weight format. Needs the
    Triton path (CUDA, or CPU with LORA_KERNELS_CPU_BACKEND=triton under the interpreter)."""
    from lora_kernels import lora_linear, nf4_lora_linear
    from lora_kernels.ops import select_backend
    from lora_kernels.ops.triton_launch import SMALL_M_ENV

    device, dtype = resolve_device_dtype(device, dtype)
    cuda = device.type == "cuda"
    kns = kns or (CUDA_KN if cuda else ((128, 64),))
    reps = reps or (30 if cuda else 3)
    warmup = warmup if warmup is not None else (5 if cuda else 1)
    out = Path(out) if out is not None else default_out_dir(device)
    backends = {select_backend(device, M, N, K, r) for (K, N) in kns for M in ms}
    if backends != {"triton"}:
        raise RuntimeError(f"the split-K sweep needs the Triton path, but {device} takes {sorted(backends)} "
                           "(use a GPU, or LORA_KERNELS_CPU_BACKEND=triton with TRITON_INTERPRET=1)")
    rows = []
    for (K, N) in kns:
        for M in ms:
            p = QLoRAProblem(M, K, N, r, device, dtype)
            x, A, B = p.x.detach(), p.lora_A.detach(), p.lora_B.detach()
            calls = {"nf4": lambda: nf4_lora_linear(x, p.qweight, A, B, p.scale),
                     "dense": lambda: lora_linear(x, p.dense, A, B, p.scale)}
            impls = {}
            for weight, fn in calls.items():
                for mode, threshold in (("split", 1 << 30), ("no_split", 0)):
                    call = _with_env(SMALL_M_ENV, threshold, fn)
                    impls[f"{weight}:{mode}"] = Impl(f"{weight}:{mode}", call, [], infer=call)
            dy = torch.empty(M, N, device=device, dtype=dtype)
            times = time_impls(impls, dy, reps, warmup, phases=("infer",))
            med = {n: statistics.median(t["infer"]) for n, t in times.items()}
            for weight in calls:
                split, no_split = med[f"{weight}:split"], med[f"{weight}:no_split"]
                rows.append({"shape": f"{M},{K},{N},{r}", "weight": weight, "M": M, "K": K, "N": N,
                             "split_ms": split, "no_split_ms": no_split, "split_vs_no_split": split / no_split})
            del p, impls
    from lora_kernels.kernels.configs import SMALL_M_MAX
    result = {"metadata": environment_metadata(device, dtype),
              "config": {"reps": reps, "warmup": warmup, "statistic": "median", "phase": "infer", "r": r,
                         "current_small_m_max": SMALL_M_MAX},
              "rows": rows,
              "suggested_small_m_max": {w: suggest_threshold(rows, w) for w in ("nf4", "dense")}}
    stem = f"split_k_{result['metadata']['dtype']}"
    write_outputs(result, out, stem, SPLIT_K_CSV_FIELDS, _plot_split_k if plot else None)
    if verbose:
        print(f"{'shape M,K,N,r':<20}{'weight':<7}{'split ms':>10}{'no split':>10}{'ratio':>8}")
        for row in rows:
            print(f"{row['shape']:<20}{row['weight']:<7}{row['split_ms']:10.4f}{row['no_split_ms']:10.4f}"
                  f"{row['split_vs_no_split']:8.3f}")
        print(f"suggested SMALL_M_MAX: {result['suggested_small_m_max']} (current {SMALL_M_MAX})")
        print(f"wrote {out}/{stem}.{{json,csv,png}}")
    return result


def _plot_split_k(result, path):
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for weight in ("nf4", "dense"):
        for K, N in dict.fromkeys((r["K"], r["N"]) for r in rows):
            pts = [(r["M"], r["split_vs_no_split"]) for r in rows if r["weight"] == weight and (r["K"], r["N"]) == (K, N)]
            ax.plot(*zip(*pts), marker="o", ms=3, label=f"{weight} {K}x{N}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("forward time, split-K / no split")
    ax.legend(fontsize=6)
    meta = result["metadata"]
    ax.set_title(f"small-M split-K, {meta['device']}, {meta['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- output

def format_table(rows, meta) -> str:
    """Fixed-width text table of QLoRA rows (ms; ratios are time over PEFT's / dense's time)."""
    mib = lambda v: None if v is None else v / 2 ** 20  # noqa: E731
    lines = [f"{meta['device']}  {meta['dtype']}  torch {meta['torch']}  bitsandbytes {meta['bitsandbytes']}  "
             f"peft {meta['peft']}",
             f"{'shape M,K,N,r':<20}{'impl':<20}{'fwd':>8}{'fwdbwd':>8}{'infer':>8}{'fwd/peft':>9}"
             f"{'fb/peft':>8}{'fwd/dense':>10}{'saved MiB':>10}{'peak MiB':>9}"]
    for r in rows:
        lines.append(f"{r['shape']:<20}{r['impl']:<20}{fmt_num(r['fwd_ms'], '8.3f')}"
                     f"{fmt_num(r['fwdbwd_ms'], '8.3f')}{fmt_num(r['infer_ms'], '8.3f')}"
                     f"{fmt_num(r['fwd_vs_peft'], '9.3f')}{fmt_num(r['fwdbwd_vs_peft'], '8.3f')}"
                     f"{fmt_num(r['fwd_vs_dense'], '10.3f')}{fmt_num(mib(r['saved_bytes']), '10.2f')}"
                     f"{fmt_num(mib(r['peak_fwdbwd_bytes']), '9.1f')}")
    return "\n".join(lines)


def format_goals(goals) -> str:
    checks = goals["checks"]
    met = sum(c["met"] for c in checks)
    head = f"QLoRA goals: {met}/{len(checks)} met"
    if goals["device_type"] != "cuda":
        head += " (CPU run: the goals are GPU goals, shown for completeness)"
    missed = [f"  {c['goal']} at {c['shape']}: {fmt_num(c['ratio'], '.3f')} > {c['max']:.3f}"
              for c in checks if not c["met"]]
    return "\n".join([head] + missed[:20] + (["  ..."] if len(missed) > 20 else []))


def _plot(result, path):
    import matplotlib.pyplot as plt

    rows = result["rows"]
    kns = list(dict.fromkeys((r["K"], r["N"]) for r in rows))
    panels = [("fwd_vs_peft", "forward: time / PEFT+bnb"), ("fwdbwd_vs_peft", "fwd+bwd: time / PEFT+bnb"),
              ("fwd_vs_dense", "forward: time / dense base matmul")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for impl in ("lora_kernels_nf4", "lora_kernels_nf4_fa", "bnb_matmul_4bit"):
            for K, N in kns:
                pts = [(r["M"], r[key]) for r in rows
                       if r["impl"] == impl and (r["K"], r["N"]) == (K, N) and r[key] is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, label=f"{impl} {K}x{N}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel(label)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    meta = result["metadata"]
    fig.suptitle(f"QLoRA layer (NF4, r={RANK}), {meta['device']}, {meta['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser):
    """QLoRA bench CLI options."""
    add_common_arguments(parser, impls=QLORA_IMPLS)
    parser.add_argument("--reps", type=int, default=None, help="timed samples (default 10 CPU, 30 CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default 2 CPU, 5 CUDA)")
    parser.add_argument("--flush-l2", action="store_true", help="CUDA: evict L2 before every sample")


def run_from_args(args) -> dict:
    return run(shapes=args.shapes, device=args.device, dtype=args.dtype, reps=args.reps, warmup=args.warmup,
               out=args.out, impls=args.impls, flush_l2=args.flush_l2)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
