"""Each opt-in dispatch route beside the default it would replace, from the result files of one device
run: ``python -m lora_kernels routes [--results DIR]`` (default ``benchmarks/results/device-run``;
``benchmarks/run_device.sh`` prints it last).

The routes written without a GPU are switched off (or pinned) by environment variables until a
measurement settles them; the benchmarks time each beside its default in the same run. This reads
every ``*.json`` below DIR that the benchmarks wrote (bench, qlora, gemv, train; any nesting) and
prints, per route, the time ratio candidate / baseline of each case the two share (< 1: the route
is faster) and a one-line verdict: in how many cases it is faster, the median ratio, and the cases
where it loses most. Deciding a default stays a human step (the rule and its evidence go into the
code's comments); this only lays the evidence out.
"""
import argparse
import json
import statistics
from pathlib import Path
from typing import NamedTuple, Optional

DEFAULT_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "device-run"


class Route(NamedTuple):
    """An opt-in route: its rows (``candidate``) against the default's (``baseline``) in the results of
    ``kind`` ("layer": bench / qlora rows by impl; "gemv": gemv rows by kernel; "train": rows by
    variant), over the timing ``columns``, in the cases ``applies`` accepts (row -> bool)."""
    title: str
    kind: str
    candidate: str
    baseline: str
    columns: tuple
    switch: str
    applies: Optional[object] = None


ROUTES = (
    Route("tensor-core GEMV vs SIMT GEMV (decode GEMV + LoRA)", "gemv", "mma", "simt", ("gemv_lora_ms",),
          "LORA_KERNELS_NF4_GEMV_KERNEL=mma"),
    Route("tensor-core GEMV vs SIMT GEMV (QLoRA layer forward)", "layer", "lora_kernels_nf4_gemv_mma",
          "lora_kernels_nf4_gemv", ("fwd_ms", "infer_ms"), "LORA_KERNELS_NF4_GEMV_KERNEL=mma"),
    Route("CUDA GEMV (launches of 16 rows) vs the slab route, M 17-64", "layer", "lora_kernels_nf4_gemv",
          "lora_kernels_nf4_cublas", ("fwd_ms", "infer_ms"), "LORA_KERNELS_NF4_GEMV_MAX_M",
          lambda row: 16 < row["M"] <= 64),
    Route("CUDA GEMV (launches of 16 rows) vs the fused Triton GEMM, M 17-64", "layer", "lora_kernels_nf4_gemv",
          "lora_kernels_nf4_triton", ("fwd_ms", "infer_ms"), "LORA_KERNELS_NF4_GEMV_MAX_M",
          lambda row: 16 < row["M"] <= 64),
    Route("CUDA dX kernel vs the default backward, M <= 64", "layer", "lora_kernels_nf4_cuda_dx", "lora_kernels_nf4",
          ("bwd_ms", "fwdbwd_ms"), "LORA_KERNELS_NF4_GRAD_INPUT_MAX_M", lambda row: row["M"] <= 64),
    Route("CUDA slab decoder vs the default (slab route)", "layer", "lora_kernels_nf4_cublas_cuda",
          "lora_kernels_nf4_cublas", ("fwd_ms", "bwd_ms", "fwdbwd_ms"), "LORA_KERNELS_NF4_SLAB_DECODER=cuda"),
    Route("Triton tiles for every slab vs the default (bitsandbytes' forward slabs)", "layer",
          "lora_kernels_nf4_cublas_triton", "lora_kernels_nf4_cublas", ("fwd_ms", "bwd_ms", "fwdbwd_ms"),
          "LORA_KERNELS_NF4_SLAB_DECODER=triton"),
    Route("dense cuBLAS base route vs the Triton GEMMs", "layer", "lora_kernels_cublas", "lora_kernels",
          ("fwd_ms", "bwd_ms", "fwdbwd_ms"), "LORA_KERNELS_DENSE_CUBLAS_MIN_M"),
    Route("training steps: dense cuBLAS base route", "train", "lora_kernels_cublas", "lora_kernels",
          ("median_step_ms",), "LORA_KERNELS_DENSE_CUBLAS_MIN_M"),
    Route("training steps: CUDA slab decoder", "train", "lora_kernels_qlora_cuda_decode", "lora_kernels_qlora",
          ("median_step_ms",), "LORA_KERNELS_NF4_SLAB_DECODER=cuda"),
    Route("training steps: Triton slab decoder", "train", "lora_kernels_qlora_triton_decode", "lora_kernels_qlora",
          ("median_step_ms",), "LORA_KERNELS_NF4_SLAB_DECODER=triton"),
)


def _kind(data: dict) -> Optional[str]:
    rows = data.get("rows") or []
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
        return None
    if "variant" in rows[0] and "median_step_ms" in rows[0]:
        return "train"
    if "gemv_lora_ms" in rows[0]:
        return "gemv"
    if "impl" in rows[0]:
        return "layer"
    return None


def load_rows(results: Path) -> dict:
    """{kind: [(file relative to results, row), ...]} from every benchmark JSON below ``results``."""
    found = {"layer": [], "gemv": [], "train": []}
    for path in sorted(Path(results).rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        kind = _kind(data) if isinstance(data, dict) else None
        if kind:
            found[kind].extend((path.relative_to(results), row) for row in data["rows"])
    return found


def _name(route: Route, row: dict) -> Optional[str]:
    if route.kind == "gemv":
        return row.get("kernel", "simt")  # files from before the tensor-core kernel: SIMT rows only
    return row.get("variant") if route.kind == "train" else row.get("impl")


def _case(route: Route, path: Path, row: dict) -> tuple:
    folder = "" if str(path.parent) == "." else str(path.parent)  # a step's subfolder of the run
    if route.kind == "train":
        return (folder, row.get("shape"))
    return (folder, row.get("M"), row.get("K"), row.get("N"), row.get("r"))


def compare(route: Route, rows: list) -> list:
    """[(case, column, candidate ms, baseline ms, ratio)] for the cases both rows have (same results
    folder, same M, K, N, r or model), in the order found."""
    by_case = {}
    for path, row in rows:
        name = _name(route, row)
        if name in (route.candidate, route.baseline) and (route.applies is None or route.applies(row)):
            by_case.setdefault(_case(route, path, row), {})[name] = row
    out = []
    for case, pair in by_case.items():
        if len(pair) < 2:
            continue
        for column in route.columns:
            cand, base = pair[route.candidate].get(column), pair[route.baseline].get(column)
            if isinstance(cand, (int, float)) and isinstance(base, (int, float)) and base > 0:
                out.append((case, column, float(cand), float(base), float(cand) / float(base)))
    return out


def _label(case: tuple) -> str:
    folder, *rest = case
    return " ".join(str(v) for v in rest if v is not None) + (f" [{folder}]" if folder else "")


def format_route(route: Route, comparisons: list, worst: int = 3) -> str:
    head = f"{route.title}: {route.candidate} / {route.baseline} ({route.switch})"
    if not comparisons:
        return f"{head}\n  no case with both rows in these results"
    ratios = [c[4] for c in comparisons]
    faster = sum(r < 1 for r in ratios)
    lines = [head, f"  faster in {faster} of {len(ratios)} cases, median ratio {statistics.median(ratios):.3f}"
                   f" (min {min(ratios):.3f}, max {max(ratios):.3f})"]
    for case, column, cand, base, ratio in sorted(comparisons, key=lambda c: -c[4])[:worst]:
        if ratio >= 1:
            lines.append(f"  slower at {_label(case)} {column}: {cand:.4g} vs {base:.4g} ms ({ratio:.3f})")
    return "\n".join(lines)


def report(results: Path = DEFAULT_RESULTS) -> str:
    """The comparison of every route (``ROUTES``) found in ``results``, as text."""
    results = Path(results)
    if not results.is_dir():
        raise ValueError(f"results must be a directory of benchmark JSON files, got {str(results)!r}")
    rows = load_rows(results)
    return "\n".join(format_route(route, compare(route, rows[route.kind])) for route in ROUTES)


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help="folder of one device run's result files (default benchmarks/results/device-run)")


def run_from_args(args) -> str:
    text = report(args.results)
    print(text)
    return text
