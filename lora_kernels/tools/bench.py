"""Microbenchmark of one LoRA linear layer: forward, backward and forward+backward.

Implementations, all on the same device, dtype and tensors, timed in the same run:
    lora_kernels      ``lora_kernels.lora_linear`` (A and B trainable)
    lora_kernels_fa   the same with lora_A frozen (LoRA-FA)
    peft              ``peft.tuners.lora.layer.Linear`` around ``nn.Linear(K, N, bias=False)``
    peft_fa           the same with lora_A frozen
    torch_unfused     ``F.linear(x, W) + scale * F.linear(F.linear(x, A), B)`` under autograd
    base              ``F.linear(x, W)``: the floor (its backward computes dX only)
x requires grad everywhere (a hidden layer); W never does. scale = lora_alpha / r = 2.

Timing: CUDA events on CUDA, ``time.perf_counter`` on CPU; warmup calls, then the median of
``reps`` samples. Implementations are interleaved rep by rep so that clock or load drift hits all
of them alike. Backward is timed on its own: each sample runs an untimed forward, then times
``y.backward(dy)`` (no subtraction noise, no retain_graph). Gradients are reset to None before
every sample so no implementation pays for accumulation.
"""
import argparse
import csv
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import lora_kernels

ALL_IMPLS = ("lora_kernels", "lora_kernels_fa", "peft", "peft_fa", "torch_unfused", "base")
# The PEFT row each implementation is compared with: like for like in adapter trainability.
PEFT_REF = {"lora_kernels_fa": "peft_fa", "peft_fa": "peft_fa"}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
CPU_SHAPES = [(2048, 1024, 1024, 16), (256, 512, 512, 8)]
CUDA_SHAPES = [(8192, 4096, 4096, 16), (8192, 4096, 14336, 16), (8192, 14336, 4096, 16)]


# ----------------------------------------------------------------------------- environment

def _pkg_version(name: str) -> Optional[str]:
    # Metadata, not import: importing bitsandbytes on a machine without its native library
    # prints warnings and can be slow; the installed version is what the record needs.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    # platform.processor() is empty on many Linux builds; /proc/cpuinfo has the marketing name.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    """Human-readable name of ``device``: the GPU name, or the CPU model followed by "(cpu)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} (cpu)"


def device_slug(device: torch.device) -> str:
    """Directory-safe device kind: "cpu", or the GPU name slugged (e.g. "nvidia-h100-80gb-hbm3")."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def default_out_dir(device: torch.device) -> Path:
    """``benchmarks/results/<device-kind>/`` relative to the working directory."""
    return Path("benchmarks") / "results" / device_slug(device)


def environment_metadata(device="cpu", dtype: Optional[torch.dtype] = None) -> dict:
    """What a result depends on: device, library versions, git commit, UTC date, dtype, threads."""
    device = torch.device(device)
    meta = {
        "device": device_name(device),
        "device_type": device.type,
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "torch": torch.__version__,
        "triton": _pkg_version("triton"),
        "bitsandbytes": _pkg_version("bitsandbytes"),
        "peft": _pkg_version("peft"),
        "lora_kernels": lora_kernels.__version__,
        "git_commit": _git_commit(),
        "utc_date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_num_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
    return meta


# ----------------------------------------------------------------------------- implementations

@dataclass
class Impl:
    """One implementation: ``forward()`` returns y [M, N]; ``leaves`` get gradients; ``params``
    are weight/adapter tensors (excluded from activation accounting); ``infer()``, if given, is the
    inference forward (no autograd graph, x without grad)."""
    name: str
    forward: Callable[[], torch.Tensor]
    leaves: list
    params: list = field(default_factory=list)
    infer: Optional[Callable[[], torch.Tensor]] = None


@dataclass
class Problem:
    """Shared tensors: x [M, K] (requires grad), weight [N, K] (frozen), lora_A [r, K], lora_B [N, r]."""
    x: torch.Tensor
    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float
    r: int


def make_problem(M: int, K: int, N: int, r: int, device, dtype, seed: int = 0) -> Problem:
    """Random problem for x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r] (B random, not zero,
    so the LoRA branch does real work); scale = lora_alpha / r with lora_alpha = 2r."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    x = rand(M, K).requires_grad_(True)
    weight = rand(N, K, std=K ** -0.5)
    lora_A = rand(r, K, std=K ** -0.5).requires_grad_(True)
    lora_B = rand(N, r, std=r ** -0.5).requires_grad_(True)
    return Problem(x, weight, lora_A, lora_B, scale=2.0, r=r)


def _peft_linear(p: Problem, dropout_p: float, freeze_A: bool):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    N, K = p.weight.shape
    base = torch.nn.Linear(K, N, bias=False, device=p.weight.device, dtype=p.weight.dtype)
    # Share storage with the problem's weight so every implementation reads the same bytes.
    base.weight = torch.nn.Parameter(p.weight, requires_grad=False)
    alpha = 2 * p.r
    cfg = LoraConfig(r=p.r, lora_alpha=alpha, lora_dropout=dropout_p)
    layer = LoraLinear(base, adapter_name="default", config=cfg, r=p.r, lora_alpha=alpha)
    layer.to(device=p.weight.device, dtype=p.weight.dtype)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        a.copy_(p.lora_A)
        b.copy_(p.lora_B)
    a.requires_grad_(not freeze_A)
    layer.train(True)
    leaves = [p.x, b] + ([] if freeze_A else [a])
    return layer, leaves, [base.weight, a, b]


def build_impls(p: Problem, impls=ALL_IMPLS, dropout_p: float = 0.0) -> dict:
    """name -> Impl for the requested implementation names (see ``ALL_IMPLS``). With dropout_p > 0
    every LoRA implementation drops x in its LoRA branch (training mode)."""
    from lora_kernels import lora_linear

    unknown = set(impls) - set(ALL_IMPLS)
    if unknown:
        raise ValueError(f"unknown implementations {sorted(unknown)}; choose from {ALL_IMPLS}")
    x, W, A, B, s = p.x, p.weight, p.lora_A, p.lora_B, p.scale
    A_frozen = A.detach()  # same storage, no grad: LoRA-FA
    params = [W, A, B]
    out = {}
    for name in impls:
        if name == "lora_kernels":
            out[name] = Impl(name, lambda: lora_linear(x, W, A, B, s, dropout_p=dropout_p),
                             [x, A, B], params)
        elif name == "lora_kernels_fa":
            out[name] = Impl(name, lambda: lora_linear(x, W, A_frozen, B, s, dropout_p=dropout_p),
                             [x, B], params)
        elif name in ("peft", "peft_fa"):
            layer, leaves, pparams = _peft_linear(p, dropout_p, freeze_A=name == "peft_fa")
            out[name] = Impl(name, lambda layer=layer: layer(x), leaves, params + pparams)
        elif name == "torch_unfused":
            def unfused():
                xd = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
                return F.linear(x, W) + s * F.linear(F.linear(xd, A), B)
            out[name] = Impl(name, unfused, [x, A, B], params)
        elif name == "base":
            out[name] = Impl(name, lambda: F.linear(x, W), [x], params)
    return out


def available_impls(impls) -> list:
    """``impls`` without the PEFT rows when peft cannot be imported (warns)."""
    impls = list(impls)
    if any(i.startswith("peft") for i in impls):
        try:
            import peft.tuners.lora.layer  # noqa: F401
        except Exception as e:  # any import failure: the other rows are still worth measuring
            warnings.warn(f"peft unavailable ({e!r}); skipping PEFT rows")
            impls = [i for i in impls if not i.startswith("peft")]
    return impls


def probe(impl: Impl, dy: torch.Tensor) -> Optional[str]:
    """Runs one fwd+bwd of ``impl`` (dy [M, N]); returns None, or the error as text."""
    try:
        _reset_grads(impl)
        impl.forward().backward(dy)
        _reset_grads(impl)
        return None
    except Exception as e:  # report any failure of the implementation under test, keep going
        return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"


# ----------------------------------------------------------------------------- timing

def _reset_grads(impl: Impl):
    for t in impl.leaves:
        t.grad = None


def _sample(fn, setup, device, flush: Optional[torch.Tensor]):
    """Runs ``setup()`` untimed, times ``fn(state)``; returns a callable giving milliseconds
    (CUDA events are read only after the caller synchronises)."""
    state = setup()
    if flush is not None:
        flush.zero_()  # evict L2 so every sample starts cold
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn(state)
        end.record()
        del result
        return lambda: start.elapsed_time(end)
    t0 = time.perf_counter()
    result = fn(state)
    dt = (time.perf_counter() - t0) * 1e3
    del result  # outside the timed region: freeing the graph is not part of the step
    return lambda: dt


TRAIN_PHASES = ("fwd", "bwd", "fwdbwd")


def time_impls(impls: dict, dy: torch.Tensor, reps: int, warmup: int, flush_l2: bool = False,
               phases=TRAIN_PHASES) -> dict:
    """name -> {"fwd": [ms...], "bwd": [...], "fwdbwd": [...]}; dy [M, N] is the output gradient.
    phases: a subset of TRAIN_PHASES, plus "infer" (``Impl.infer`` under ``torch.no_grad()``)."""
    device = dy.device
    flush = None
    if flush_l2 and device.type == "cuda":
        flush = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device)

    def plan_for(impl):
        def reset():
            _reset_grads(impl)

        def fwd_then_keep():
            _reset_grads(impl)
            return impl.forward()

        def fwdbwd(_):
            y = impl.forward()
            y.backward(dy)
            return y

        def infer(_):
            with torch.no_grad():
                return impl.infer()

        plan = {"fwd": (lambda _: impl.forward(), reset),
                "fwdbwd": (fwdbwd, reset),
                "bwd": (lambda y: y.backward(dy), fwd_then_keep),
                "infer": (infer, reset)}
        return {ph: plan[ph] for ph in phases}

    plans = {name: plan_for(impl) for name, impl in impls.items()}
    pending = {name: {ph: [] for ph in phases} for name in impls}
    for i in range(warmup + reps):
        for name, plan in plans.items():
            for ph, (fn, setup) in plan.items():
                got = _sample(fn, setup, device, flush)
                if i >= warmup:
                    pending[name][ph].append(got)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return {name: {ph: [g() for g in lst] for ph, lst in d.items()} for name, d in pending.items()}


# ----------------------------------------------------------------------------- ceilings

def measure_ceilings(device: torch.device, dtype: torch.dtype, reps: int = 10) -> dict:
    """Device ceilings measured in the same run: copy bandwidth (GB/s, read + write bytes) of a
    large tensor and throughput (TFLOP/s) of a large square matmul in ``dtype``.

    CUDA: 1 GiB copy, 8192^3 matmul. CPU: 256 MiB copy, 2048^3 matmul.
    """
    cuda = device.type == "cuda"
    nbytes = (1 << 30) if cuda else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    n = 8192 if cuda else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def best_ms(fn):
        fn()
        times = []
        for _ in range(reps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    copy_ms = best_ms(lambda: dst.copy_(src))
    mm_ms = best_ms(lambda: torch.mm(a, b))
    return {"copy_bytes": nbytes, "copy_GBps": 2 * nbytes / copy_ms / 1e6,
            "matmul_n": n, "matmul_dtype": str(dtype).replace("torch.", ""),
            "matmul_TFLOPs": 2 * n ** 3 / mm_ms / 1e9}


# ----------------------------------------------------------------------------- driver

def parse_shapes(text: str) -> list:
    """"M,K,N,r;M,K,N,r" -> [(M, K, N, r), ...]."""
    shapes = []
    for part in text.split(";"):
        if part.strip():
            vals = tuple(int(v) for v in part.split(","))
            if len(vals) != 4:
                raise ValueError(f"shape {part!r} is not M,K,N,r")
            shapes.append(vals)
    return shapes


def resolve_device_dtype(device=None, dtype=None):
    """Defaults: CUDA + bf16 when a GPU is present, else CPU + fp32."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = DTYPES[dtype]
    return device, dtype


def _ratio(a, b):
    return a / b if a is not None and b else None


def run(shapes=None, device=None, dtype=None, reps=None, warmup=None, out=None, impls=ALL_IMPLS,
        flush_l2=False, plot=True, verbose=True) -> dict:
    """Benchmarks every (M, K, N, r) in ``shapes`` (x [M, K], weight [N, K], rank r) and writes
    bench_<dtype>.{json,csv,png} under ``out``. Returns the results dict (metadata + rows)."""
    device, dtype = resolve_device_dtype(device, dtype)
    cuda = device.type == "cuda"
    shapes = shapes or (CUDA_SHAPES if cuda else CPU_SHAPES)
    reps = reps or (50 if cuda else 20)
    warmup = warmup if warmup is not None else (10 if cuda else 3)
    out = Path(out) if out is not None else default_out_dir(device)
    impls = available_impls(impls)
    from lora_kernels.ops import select_backend

    rows, skipped = [], {}
    for (M, K, N, r) in shapes:
        p = make_problem(M, K, N, r, device, dtype)
        built = build_impls(p, impls)
        dy = torch.randn(M, N, device=device, dtype=dtype)
        # One untimed fwd+bwd per implementation: an implementation that fails is reported and
        # dropped instead of aborting the whole run.
        for n in list(built):
            err = probe(built[n], dy)
            if err is not None:
                warnings.warn(f"{n} failed at M,K,N,r={M},{K},{N},{r}: {err}")
                skipped.setdefault(f"{M},{K},{N},{r}", {})[n] = err
                del built[n]
        with torch.no_grad():
            ref = F.linear(p.x, p.weight) + p.scale * F.linear(F.linear(p.x, p.lora_A), p.lora_B)
            # Guard: every LoRA row must compute the same function (e.g. PEFT's B not left at zero).
            diffs = {n: float((i.forward() - ref).abs().max()) for n, i in built.items() if n != "base"}
        times = time_impls(built, dy, reps, warmup, flush_l2)
        med = {n: {ph: statistics.median(v) for ph, v in t.items()} for n, t in times.items()}
        shape = f"{M},{K},{N},{r}"
        for n in built:
            peft_ref = PEFT_REF.get(n, "peft")
            rows.append({
                "shape": shape, "M": M, "K": K, "N": N, "r": r, "impl": n,
                "fwd_ms": med[n]["fwd"], "bwd_ms": med[n]["bwd"], "fwdbwd_ms": med[n]["fwdbwd"],
                "ratio_vs_base": _ratio(med[n]["fwdbwd"], med.get("base", {}).get("fwdbwd")),
                "ratio_vs_peft": _ratio(med[n]["fwdbwd"], med.get(peft_ref, {}).get("fwdbwd")),
                "peft_ref": peft_ref if peft_ref in med else None,
                "fwdbwd_min_ms": min(times[n]["fwdbwd"]),
                "out_max_abs_diff": diffs.get(n),
            })
        del built, p, dy
    ceilings = measure_ceilings(device, dtype)
    result = {
        "metadata": environment_metadata(device, dtype),
        "ceilings": ceilings,
        "config": {"reps": reps, "warmup": warmup, "flush_l2": flush_l2 and cuda,
                   "statistic": "median", "bwd_timing": "untimed forward, then timed backward",
                   "lora_kernels_backend": {f"{M},{K},{N},{r}": select_backend(device, M, N, K, r)
                                            for (M, K, N, r) in shapes},
                   "scale": 2.0, "impls": list(impls)},
        "rows": rows,
        "skipped": skipped,
    }
    write_outputs(result, out, f"bench_{result['metadata']['dtype']}", BENCH_CSV_FIELDS,
                  _plot_bench if plot else None)
    if verbose:
        print(format_table(rows, result["metadata"]))
        print(f"ceilings: copy {ceilings['copy_GBps']:.1f} GB/s, "
              f"{ceilings['matmul_n']}^3 {ceilings['matmul_dtype']} matmul {ceilings['matmul_TFLOPs']:.3f} TFLOP/s")
        print(f"wrote {out}/bench_{result['metadata']['dtype']}.{{json,csv,png}}")
    return result


BENCH_CSV_FIELDS = ["shape", "impl", "fwd_ms", "bwd_ms", "fwdbwd_ms", "ratio_vs_base", "ratio_vs_peft"]


def write_outputs(result: dict, out: Path, stem: str, csv_fields, plotter=None):
    """Writes <stem>.json (metadata + rows), <stem>.csv (``csv_fields``) and, if given, <stem>.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=csv_fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(result["rows"])
    if plotter is not None:
        try:
            import matplotlib
            matplotlib.use("Agg")  # headless: never needs a display
        except ImportError:
            warnings.warn("matplotlib unavailable; no plot written")
            return
        plotter(result, out / f"{stem}.png")


def fmt_num(v, spec):
    """format(v, spec), or a right-aligned "-" of the same width for None/NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return format("-", ">" + re.match(r"\d*", spec).group())
    return format(v, spec)


def format_table(rows, meta) -> str:
    """Fixed-width text table of bench rows."""
    head = f"{meta['device']}  {meta['dtype']}  torch {meta['torch']}  peft {meta['peft']}"
    lines = [head, f"{'shape M,K,N,r':<22}{'impl':<17}{'fwd ms':>9}{'bwd ms':>9}{'fwd+bwd':>9}"
                   f"{'x base':>8}{'x peft':>8}"]
    for r in rows:
        lines.append(f"{r['shape']:<22}{r['impl']:<17}{fmt_num(r['fwd_ms'], '9.3f')}"
                     f"{fmt_num(r['bwd_ms'], '9.3f')}{fmt_num(r['fwdbwd_ms'], '9.3f')}"
                     f"{fmt_num(r['ratio_vs_base'], '8.3f')}{fmt_num(r['ratio_vs_peft'], '8.3f')}")
    return "\n".join(lines)


def _plot_bench(result, path):
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["ratio_vs_base"] is not None]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = 0.8 / max(len(impls), 1)
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(shapes) + 2), 4))
    for j, impl in enumerate(impls):
        vals = [next((r["ratio_vs_base"] for r in rows if r["shape"] == s and r["impl"] == impl), 0)
                for s in shapes]
        ax.bar([i + j * width for i in range(len(shapes))], vals, width, label=impl)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(shapes))])
    ax.set_xticklabels([f"M,K,N,r={s}" for s in shapes], fontsize=8)
    ax.set_ylabel("fwd+bwd time / base-only")
    meta = result["metadata"]
    ax.set_title(f"LoRA linear fwd+bwd vs base, {meta['device']}, {meta['dtype']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI

def add_common_arguments(parser: argparse.ArgumentParser, impls=ALL_IMPLS):
    """--device, --dtype, --shapes, --out, --impls (shared by bench, memory and qlora)."""
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if present)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--shapes", type=parse_shapes, default=None, help='"M,K,N,r;M,K,N,r"')
    parser.add_argument("--out", type=Path, default=None,
                        help="output dir (default benchmarks/results/<device-kind>/)")
    parser.add_argument("--impls", type=lambda s: [v for v in s.split(",") if v], default=list(impls),
                        help=f"comma-separated subset of {','.join(impls)}")


def add_arguments(parser: argparse.ArgumentParser):
    """Bench CLI options."""
    add_common_arguments(parser)
    parser.add_argument("--reps", type=int, default=None, help="timed samples (default 20 CPU, 50 CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default 3 CPU, 10 CUDA)")
    parser.add_argument("--flush-l2", action="store_true", help="CUDA: evict L2 before every sample")


def run_from_args(args) -> dict:
    return run(shapes=args.shapes, device=args.device, dtype=args.dtype, reps=args.reps,
               warmup=args.warmup, out=args.out, impls=args.impls, flush_l2=args.flush_l2)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
