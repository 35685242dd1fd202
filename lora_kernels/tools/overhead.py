"""Host time per layer call: ``python -m lora_kernels overhead``.

A GPU finishes a small layer's kernels (a decode step, the 1B model's projections at 4096 tokens)
faster than eager PyTorch queues them: such calls are bound by host time (Python, argument checks,
kernel launches), and a training step of many small layers is bound by the sum of those. This tool
times that host side for each provider, one LoRA layer at a time, inside a PEFT model as a user runs
it: PEFT's ``lora.Linear`` / ``lora.bnb.Linear4bit`` as is, and patched by
``lora_kernels.patch_peft_model`` (with lora_A frozen too).

    infer    forward under torch.no_grad()
    fwd      forward recording the autograd graph (x requires grad, as inside a model)
    fwdbwd   forward + backward

Per call: ``host_us``, the time until the call returns to Python (on a GPU before any
synchronisation: what the host spends queueing the work), ``wall_us`` (on a GPU: including the
device finishing that work; host_us <= wall_us, equal when host-bound), and ``launches``, the
Triton launches per call. Times are per call, from the best of ``reps`` batches of ``calls`` calls,
providers interleaved.

Without a GPU the patched providers run the GPU route dry (``tools.dry_run``: Triton kernels
compiled for sm_90, launches recorded, not run; CUDA-extension routes are not taken; bitsandbytes'
slab decoder, the CUDA default, runs its CPU kernel) and PEFT's
layers run their CPU ops (on one thread) at a shape small enough for compute to be negligible: the host-side costs
compare, absolute times are this CPU's. Results: JSON and CSV (``overhead_<dtype>``).
"""
import argparse
import contextlib
import random
import time
from pathlib import Path
from typing import Optional

import torch

PROVIDERS = ("peft", "lora_kernels", "lora_kernels_fa", "peft_qlora", "lora_kernels_qlora", "lora_kernels_qlora_fa")
MODES = ("infer", "fwd", "fwdbwd")
CPU_SHAPES = ((64, 64, 64),)  # (M, K, N): compute negligible beside host costs on a CPU
CUDA_SHAPES = ((4, 4096, 4096), (4096, 2048, 2048))  # a decode step; a 1B-model projection at 4x1024 tokens
CSV_FIELDS = ("provider", "family", "M", "K", "N", "r", "mode", "host_us", "wall_us", "launches",
              "host_vs_peft", "dry_run")


def family_of(provider: str) -> str:
    return "qlora" if "qlora" in provider else "dense"


def reference_of(provider: str) -> str:
    return "peft_qlora" if family_of(provider) == "qlora" else "peft"


class _OneProjection(torch.nn.Module):
    """The smallest model PEFT wraps like a real one: one ``q_proj``."""

    def __init__(self, K: int, N: int):
        super().__init__()
        self.q_proj = torch.nn.Linear(K, N, bias=False)

    def forward(self, x):
        return self.q_proj(x)


def build_layer(provider: str, K: int, N: int, r: int, device, dtype, seed: int = 0):
    """A PEFT model holding one LoRA projection [N, K] of ``provider`` (training mode, random adapters)."""
    from lora_kernels.tools.models import add_lora, quantize_projections

    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    torch.manual_seed(seed)
    model = _OneProjection(K, N).to(device=device, dtype=dtype)
    if family_of(provider) == "qlora":
        quantize_projections(model, compute_dtype=dtype, targets=("q_proj",))
    variant = "peft"  # models.VARIANTS: the patched providers are lora_kernels[_qlora] and ..._fa
    if provider.startswith("lora_kernels"):
        variant = "lora_kernels_fa" if provider.endswith("_fa") else "lora_kernels"
    return add_lora(model, variant, ("q_proj",), r, 2 * r, device, seed + 1)


def _calls(model, x, dy, mode: str):
    if mode == "infer":
        def call():
            with torch.no_grad():
                model(x)
    elif mode == "fwd":
        def call():
            model(x)
    elif mode == "fwdbwd":
        def call():
            model(x).backward(dy)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return call


def time_batch(call, device: torch.device, calls: int) -> tuple:
    """(host_us, wall_us) per call over one batch of ``calls`` calls (the device idle at the start)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    t1 = time.perf_counter()
    if cuda:
        torch.cuda.synchronize(device)
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e6, (t2 - t0) / calls * 1e6


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """On a CPU, one intra-op thread inside the block: PEFT's small CPU matmuls (what its rows run
    here, where a GPU host only queues them) otherwise pay OpenMP's wake-ups, which made its times
    vary by up to 2x from batch to batch on a 2-core machine."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def measure(providers, M: int, K: int, N: int, r: int, device, dtype, modes=MODES, calls: int = 50,
            reps: int = 7, warmup: int = 3, seed: int = 0) -> list:
    """Rows (dicts) at x [M, K], weight [N, K], rank r: one per provider and mode. Providers are timed
    batch by batch in a fresh random order each rep (a call's host time depends on what ran before
    it: caches, allocator); a row's times are the best batch (noise on a host only adds time)."""
    from lora_kernels.tools.dry_run import count_launches, dry_run

    device = torch.device(device)
    dry = device.type == "cpu" and any(p.startswith("lora_kernels") for p in providers)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    dy = torch.randn(M, N, generator=g).to(device=device, dtype=dtype)
    rows = []
    order = random.Random(seed)
    # PEFT's layers never reach lora_kernels' launchers: one dry-run block can hold every provider.
    with dry_run() if dry else contextlib.nullcontext(), _one_cpu_thread(device):
        models = {p: build_layer(p, K, N, r, device, dtype, seed) for p in providers}
        for mode in modes:
            calls_of = {p: _calls(m, x, dy, mode) for p, m in models.items()}
            launches = {}
            for p, call in calls_of.items():
                for _ in range(warmup):
                    call()  # the first compiles (in a dry run: ahead of time)
                with count_launches() as counted:
                    call()
                launches[p] = sum(counted.values())
            times = {p: [] for p in providers}
            names = list(providers)
            for _ in range(reps):
                order.shuffle(names)
                for p in names:
                    times[p].append(time_batch(calls_of[p], device, calls))
            x.grad = None
            for p in providers:
                host_us, wall_us = min(times[p])
                rows.append({"provider": p, "family": family_of(p), "M": M, "K": K, "N": N, "r": r, "mode": mode,
                             "host_us": host_us, "wall_us": wall_us, "launches": launches[p],
                             "dry_run": dry and p.startswith("lora_kernels")})
    return rows


def add_ratios(rows: list) -> list:
    """host_vs_peft: host_us over the PEFT reference row of the same family, shape and mode."""
    ref = {(r["provider"], r["M"], r["K"], r["N"], r["mode"]): r["host_us"] for r in rows}
    for row in rows:
        base = ref.get((reference_of(row["provider"]), row["M"], row["K"], row["N"], row["mode"]))
        row["host_vs_peft"] = row["host_us"] / base if base else None
    return rows


def run(device=None, dtype=None, shapes=None, providers=PROVIDERS, modes=MODES, r: int = 16, calls: int = 50,
        reps: int = 7, out=None, quiet: bool = False) -> dict:
    """Measure every (shape, provider, mode); write ``overhead_<dtype>.json/.csv`` under ``out``
    (default ``benchmarks/results/<device-kind>/``) unless out is False. Returns the result dict."""
    from lora_kernels.tools.bench import check_names, default_out_dir, environment_metadata, resolve_device_dtype, write_outputs
    from lora_kernels.tools.models import bitsandbytes_importable

    device, dtype = resolve_device_dtype(device, dtype)
    if device.type == "cpu" and dtype != torch.float32 and not quiet:
        print("overhead: on a CPU, 16-bit matmuls cost compute time; float32 keeps PEFT's rows host-bound")
    shapes = tuple(shapes or (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES))
    for shape in shapes:
        if len(shape) != 3 or any(int(v) < 1 for v in shape):
            raise ValueError(f"shapes must be (M, K, N) triples of positive ints, got {shape}")
    providers = check_names("providers", providers, PROVIDERS)
    modes = check_names("modes", modes, MODES)
    skipped = {}
    if any(family_of(p) == "qlora" for p in providers) and not bitsandbytes_importable():
        skipped = {p: "bitsandbytes not importable" for p in providers if family_of(p) == "qlora"}
        providers = tuple(p for p in providers if p not in skipped)
    rows = []
    for M, K, N in shapes:
        rows += measure(providers, int(M), int(K), int(N), r, device, dtype, modes, calls, reps)
    add_ratios(rows)
    result = {"metadata": environment_metadata(device, dtype),
              "config": {"shapes": [list(s) for s in shapes], "r": r, "calls": calls, "reps": reps,
                         "modes": list(modes), "statistic": "best batch mean (providers interleaved)",
                         "dry_run": "patched providers on a CPU: Triton launches recorded, not run "
                                    "(tools.dry_run); one intra-op thread" if device.type == "cpu" else None},
              "rows": rows, "skipped": skipped}
    if not quiet:
        print(format_table(rows, absolute=device.type == "cuda"))
    if out is not False:
        write_outputs(result, Path(out) if out else default_out_dir(device),
                      f"overhead_{str(dtype).replace('torch.', '')}", CSV_FIELDS)
    return result


def format_table(rows, absolute: bool = True) -> str:
    """Text table of the rows; ``absolute`` False (no GPU): host time ÷ PEFT's only, no µs."""
    times = f" {'host us':>9} {'wall us':>9}" if absolute else ""
    lines = [f"{'shape':>16} {'provider':24} {'mode':7}{times} {'launches':>8} {'host vs PEFT':>12}"]
    for row in rows:
        ratio = f"{row['host_vs_peft']:.2f}x" if row.get("host_vs_peft") else "-"
        shape = f"{row['M']}x{row['K']}x{row['N']}"
        times = f" {row['host_us']:9.1f} {row['wall_us']:9.1f}" if absolute else ""
        lines.append(f"{shape:>16} {row['provider']:24} {row['mode']:7}{times} {row['launches']:8d} {ratio:>12}")
    if not absolute:
        lines.append("(no GPU: host time as a ratio to PEFT's of the same run only)")
    return "\n".join(lines)


def _shape_list(text: str) -> list:
    try:
        return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes: MxKxN[,MxKxN...], got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--shapes", type=_shape_list, default=None,
                        help="MxKxN list (default 4x4096x4096,4096x2048x2048 on CUDA, 64x64x64 on CPU)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {', '.join(PROVIDERS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--calls", type=int, default=50, help="calls per timed batch")
    parser.add_argument("--reps", type=int, default=7, help="timed batches (the fastest is kept: host noise only adds time)")
    parser.add_argument("--out", default=None)


def run_from_args(args) -> dict:
    for name in ("r", "calls", "reps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    return run(device=args.device, dtype=args.dtype, shapes=args.shapes, providers=args.providers, modes=args.modes,
               r=args.r, calls=args.calls, reps=args.reps, out=args.out)


def main(argv: Optional[list] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m lora_kernels overhead", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
