"""Decode benchmark of the CUDA NF4 GEMV (csrc/), against the goals of its issue.

    python -m lora_kernels gemv [--device D] [--dtype bf16|fp16] [--shapes "K,N;K,N"] [--m 1,4,16] [--r 16]

For each weight (K, N) (default the issue's 8192×28672 and 4096×14336), decode M (default 1, 4,
16) and kernel of the op (``--kernels``, default both: ``simt`` and the tensor-core ``mma``, where
the device and shape allow it), one inference forward of, timed side by side in the same run:
    gemv_lora   ``lora_kernels::nf4_gemv_lora`` (NF4 decode GEMV with the fused LoRA term, rank r)
    gemv_base   the same op with rank 0: the decode GEMV alone (the LoRA term's cost is the difference)
    bnb         bitsandbytes ``matmul_4bit`` on the same NF4 bytes (no LoRA)
    dense       ``F.linear`` on the dense weight in x's dtype (cuBLAS on CUDA)
One row per kernel (bnb and dense timed once, repeated in both). Each row: ms per provider, the
GEMV's weight bytes per second (packed codes + block scales, read once) as a fraction of the
device-copy bandwidth measured in the same run, its speed-up over bnb and over the dense matmul,
and the LoRA term's overhead. Goals (issue 5, at M = 1): ≥ 85 % of copy
bandwidth, ≥ 1.5× bnb, ≥ 3.3× dense, LoRA term ≤ 5 %. On CUDA the op needs the built extension
(``lora_kernels._C``); on CPU it runs its PyTorch spec (structure checks only: CPU times say nothing
about the kernel). Writes gemv_<dtype>.{json,csv} with the metadata.
"""
import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_kernels.ops.nf4 import NF4Tensors
from lora_kernels.ops.nf4_gemv import GEMV_KERNELS, gemv_kernel
from lora_kernels.tools.bench import (Impl, default_out_dir, default_timing, environment_metadata,
                                      fmt_num, goal_check,
                                      measure, measure_ceilings, resolve_device_dtype, standalone_main,
                                      write_outputs)
from lora_kernels.tools.report import absolute_times, goal_counts

DEFAULT_KN = ((8192, 28672), (4096, 14336))
CPU_KN = ((512, 768),)
DEFAULT_M = (1, 4, 16)
GOALS = {"copy_fraction_min": 0.85, "speedup_vs_bnb_min": 1.5, "speedup_vs_dense_min": 3.3,
         "lora_overhead_max": 0.05}
PROVIDERS = ("gemv_lora", "gemv_base", "bnb", "dense")
CSV_FIELDS = ["K", "N", "M", "r", "kernel", "gemv_lora_ms", "gemv_base_ms", "bnb_ms", "dense_ms", "gemv_GBps",
              "copy_fraction", "speedup_vs_bnb", "speedup_vs_dense", "lora_overhead", "rel_err"]


def _op_call(x, q, A, B, scale, kernel: str = "simt"):
    index = GEMV_KERNELS.index(kernel)
    return lambda: torch.ops.lora_kernels.nf4_gemv_lora(
        x, *q.op_tensors(), A, B, None, scale, q.blocksize, q.nested_blocksize, q.dtype, index)[0]


def _names(kernel: str) -> tuple:
    """Provider names of one kernel's GEMV with and without the LoRA term."""
    return ("gemv_lora", "gemv_base") if kernel == "simt" else (f"gemv_{kernel}_lora", f"gemv_{kernel}_base")


def _providers(x, q, W, A, B, scale, kernels=("simt",)) -> dict:
    """name -> Impl (inference only) for one problem (the op is defined by importing lora_kernels)."""
    out = {"dense": lambda: F.linear(x, W)}
    for kernel in kernels:
        lora, base = _names(kernel)
        out[lora] = _op_call(x, q, A, B, scale, kernel)
        out[base] = _op_call(x, q, A[:0], B[:, :0], scale, kernel)
    try:
        import bitsandbytes as bnb

        from lora_kernels.integrations.bitsandbytes import nf4_to_bnb
        weight, state = nf4_to_bnb(q)
        out["bnb"] = lambda: bnb.matmul_4bit(x, weight.data.t(), quant_state=state)
    except ImportError:
        pass
    return {name: Impl(name, fn, [], [], infer=fn) for name, fn in out.items()}


def _runnable(kernels, x, q, device) -> list:
    """The kernels that really run for this call on this device (the op's own eligibility rule; on
    CPU both run the op's PyTorch spec)."""
    if device.type != "cuda":
        return list(kernels)
    return [k for k in kernels if gemv_kernel(x, NF4Tensors.of(q), k) == k]


def _rel_err(y, ref) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def run(device=None, dtype=None, kns=None, ms=DEFAULT_M, r: int = 16, out=None, reps=None, warmup=None,
        verbose: bool = True, kernels=GEMV_KERNELS) -> dict:
    """Times the providers (module docstring) for every (K, N) in ``kns`` and M in ``ms``; writes
    gemv_<dtype>.{json,csv} under ``out`` and returns the result (metadata, ceilings, rows, goals)."""
    from lora_kernels import NF4Weight
    from lora_kernels.ops.nf4_gemv import GEMV_MAX_RANK, GEMV_MAX_ROWS, extension_runs_on, load_extension

    device, dtype = resolve_device_dtype(device, dtype)
    if dtype not in (torch.float16, torch.bfloat16) and device.type == "cuda":
        raise ValueError(f"dtype must be float16 or bfloat16 on CUDA (the GEMV's inputs), got {dtype}")
    if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= GEMV_MAX_RANK:
        raise ValueError(f"r must be an int in [1, {GEMV_MAX_RANK}], got {r!r}")
    kernels = tuple(kernels)
    if not kernels or any(k not in GEMV_KERNELS for k in kernels):
        raise ValueError(f"kernels must be values in {list(GEMV_KERNELS)}, got {list(kernels)}")
    ms = tuple(ms)
    if not ms or any(not 1 <= m <= GEMV_MAX_ROWS for m in ms):
        raise ValueError(f"ms must be values in [1, {GEMV_MAX_ROWS}], got {list(ms)}")
    kns = tuple(kns) if kns else (DEFAULT_KN if device.type == "cuda" else CPU_KN)
    if device.type == "cuda" and not load_extension():
        raise RuntimeError("the CUDA GEMV is not built: run `python setup.py build_ext --inplace` (or "
                           "`pip install --no-build-isolation -e .`) on this machine first")
    if device.type == "cuda" and not extension_runs_on(device):
        raise RuntimeError("the CUDA GEMV is not built for this GPU's architecture: rebuild with "
                           "LORA_KERNELS_CUDA_ARCHS=<its compute capability, e.g. 90>")
    timing = default_timing(reps=reps, warmup=warmup)
    g = torch.Generator().manual_seed(0)
    rows = []
    for K, N in kns:
        W = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(device=device, dtype=dtype)
        q = NF4Weight.quantize(W)  # on the device, stored in x's dtype (the common QLoRA case)
        Wd = q.dequantize().to(dtype)
        A = (torch.randn(r, K, generator=g) / math.sqrt(K)).to(device=device, dtype=dtype)
        B = (torch.randn(N, r, generator=g) / math.sqrt(r)).to(device=device, dtype=dtype)
        for M in ms:
            x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype)
            runnable = _runnable(kernels, x, q, device)
            impls = _providers(x, q, Wd, A, B, 0.5, runnable)
            ref = x.double() @ Wd.double().t() + 0.5 * (x.double() @ A.double().t()) @ B.double().t()
            dy = torch.zeros(M, N, device=device, dtype=dtype)
            med = measure([impls], [dy], ("infer",), timing)
            t = {name: med[name]["infer"] for name in med}
            for kernel in runnable:
                lora, base = _names(kernel)
                with torch.no_grad():
                    err = _rel_err(impls[lora].infer(), ref)
                gbps = q.nbytes / (t[lora] * 1e6)
                rows.append({"K": K, "N": N, "M": M, "r": r, "kernel": kernel, "gemv_lora_ms": t[lora],
                             "gemv_base_ms": t[base], "bnb_ms": t.get("bnb"), "dense_ms": t["dense"],
                             "gemv_GBps": gbps, "rel_err": err,
                             "speedup_vs_bnb": t["bnb"] / t[lora] if "bnb" in t else None,
                             "speedup_vs_dense": t["dense"] / t[lora],
                             "lora_overhead": t[lora] / t[base] - 1.0})
            if verbose and device.type == "cuda":  # absolute times only from a GPU
                print(f"K={K} N={N} M={M}: " + ", ".join(f"{n} {fmt_num(v, '.4f')} ms" for n, v in t.items()),
                      flush=True)
        del W, q, Wd, A, B
    ceilings = measure_ceilings(device, dtype)
    for row in rows:
        row["copy_fraction"] = row["gemv_GBps"] / ceilings["copy_GBps"]
    result = {"metadata": environment_metadata(device, dtype), "ceilings": ceilings,
              "config": {"providers": list(PROVIDERS), "kernels": list(kernels), "timing": timing.describe(device),
                         "statistic": "median",
                         "gemv_bytes": "NF4Weight.nbytes (packed codes + block scales), read once per call",
                         "copy_fraction": "gemv_GBps / the device-copy ceiling (read + write bytes per second)",
                         "lora_overhead": "gemv_lora_ms / gemv_base_ms - 1 (rank r vs rank 0, same op)"},
              "rows": rows, "goals": check_goals(rows, device.type)}
    out = Path(out) if out is not None else default_out_dir(device)
    stem = f"gemv_{result['metadata']['dtype']}"
    write_outputs(result, out, stem, CSV_FIELDS)
    if verbose:
        print(format_table(rows, result["goals"], absolute=absolute_times(result["metadata"])))
        print(f"wrote {out}/{stem}.{{json,csv}}")
    return result


def check_goals(rows, device_type: str) -> dict:
    """The issue's goals at M = 1: one check per (goal, shape, kernel)."""
    checks = []
    for row in rows:
        if row["M"] != 1:
            continue
        for goal, key, bound, at_least in (("copy bandwidth", "copy_fraction", GOALS["copy_fraction_min"], True),
                                           ("vs bitsandbytes", "speedup_vs_bnb", GOALS["speedup_vs_bnb_min"], True),
                                           ("vs dense", "speedup_vs_dense", GOALS["speedup_vs_dense_min"], True),
                                           ("LoRA overhead", "lora_overhead", GOALS["lora_overhead_max"], False)):
            checks.append(goal_check(goal, f"{row['K']}x{row['N']} {row['kernel']}", row.get(key),
                                     **({"min": bound} if at_least else {"max": bound})))
    return {"bounds": GOALS, "checks": checks, "device_type": device_type}


def format_table(rows, goals, absolute: bool = True) -> str:
    """Text table of the rows: ms, GB/s and the ratios; ``absolute`` False (no GPU): the ratios only."""
    times = f"{'gemv+lora':>11}{'gemv':>9}{'bnb':>9}{'dense':>9}{'GB/s':>8}" if absolute else ""
    lines = [f"{'K x N':<14}{'M':>3}{'kernel':>7}{times}{'x copy':>8}{'x bnb':>7}{'x dense':>8}{'lora':>7}"]
    for r in rows:
        times = (f"{fmt_num(r['gemv_lora_ms'], '11.4f')}{fmt_num(r['gemv_base_ms'], '9.4f')}"
                 f"{fmt_num(r['bnb_ms'], '9.4f')}{fmt_num(r['dense_ms'], '9.4f')}{fmt_num(r['gemv_GBps'], '8.1f')}"
                 if absolute else "")
        lines.append(f"{str(r['K']) + 'x' + str(r['N']):<14}{r['M']:>3}{r['kernel']:>7}{times}"
                     f"{fmt_num(r['copy_fraction'], '8.3f')}{fmt_num(r['speedup_vs_bnb'], '7.2f')}"
                     f"{fmt_num(r['speedup_vs_dense'], '8.2f')}{fmt_num(r['lora_overhead'], '7.3f')}")
    note = " (GPU goals: CPU values say nothing)" if goals["device_type"] != "cuda" else ""
    lines.append(f"goals at M=1{note}: {goal_counts(goals['checks'])}")
    return "\n".join(lines)


def _kn_list(text: str) -> list:
    try:
        pairs = [tuple(int(v) for v in item.split(",")) for item in text.split(";") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f'shapes must look like "K,N;K,N", got {text!r}') from None
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f'shapes must look like "K,N;K,N" with positive sizes, got {text!r}')
    return pairs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if present)")
    parser.add_argument("--dtype", default=None, choices=("bf16", "bfloat16", "fp16", "float16", "fp32", "float32"),
                        help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--shapes", type=_kn_list, default=None, help='weights "K,N;K,N" (default: the issue\'s)')
    parser.add_argument("--m", type=lambda s: [int(v) for v in s.split(",") if v], default=list(DEFAULT_M),
                        help="decode rows, each in [1, 16] (default 1,4,16)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--kernels", type=lambda s: [v for v in s.split(",") if v], default=list(GEMV_KERNELS),
                        help="kernels of the op to time: simt, mma (default both; a kernel the device or "
                             "shape does not allow is left out)")
    parser.add_argument("--reps", type=int, default=None, help="CPU: timed samples")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default benchmarks/results/<device>/)")


def run_from_args(args) -> dict:
    return run(device=args.device, dtype=args.dtype, kns=args.shapes, ms=args.m, r=args.r, out=args.out,
               reps=args.reps, kernels=args.kernels)


def main(argv=None) -> dict:
    return standalone_main(__doc__, add_arguments, run_from_args, argv)


if __name__ == "__main__":
    main()
