"""README results section generator: every kind of result file renders from its rows, nothing is
dropped, the README changes only between the markers, --check catches drift."""
import json
import random
import re
from pathlib import Path

import pytest

from lora_kernels.tools import report
from lora_kernels.tools.report import BEGIN_MARKER, END_MARKER, fmt_bytes, fmt_num, fmt_param, fmt_ratio, fmt_saved

REPO = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[-+]\d+)?")


def meta(device="NVIDIA H200", date="2026-12-01T08:00:00+00:00", dtype="bfloat16", **extra):
    return {"device": device, "device_type": "cuda", "dtype": dtype, "torch": "2.11.0+cu130",
            "triton": "3.6.0", "peft": "0.21.2", "bitsandbytes": "0.50.2", "git_commit": "abc1234",
            "utc_date": date, **extra}


def write(root: Path, rel: str, data) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def section_of(markdown: str, name: str) -> list:
    """Lines of the file section that starts with the heading naming ``name``, up to the next
    file heading or group heading."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"**[`{name}`]"))
    end = next((j for j in range(start + 1, len(lines))
                if lines[j].startswith("**[`") or lines[j].startswith("### ")), len(lines))
    return lines[start:end]


def table_bodies(lines: list) -> list:
    """Body rows (lists of cells) of every markdown table in ``lines``."""
    rows, in_table = [], False
    for line in lines:
        if not line.startswith("|"):
            in_table = False
            continue
        if re.fullmatch(r"\|(---\|)+", line):
            in_table = True
            continue
        if in_table:
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def backed_numbers(rows, extra=()) -> set:
    """Every number a renderer may print for ``rows``: each numeric field in the fixed formats,
    plus ``extra`` (values the test computes itself)."""
    out = set()
    for row in rows:
        for v in row.values():
            if isinstance(v, bool) or v is None:
                continue
            if isinstance(v, (int, float)):
                out |= {fmt_num(v), fmt_ratio(v).rstrip("×"), fmt_param(v)}
                out |= set(NUMBER.findall(fmt_saved(v) if isinstance(v, int) else ""))
            elif isinstance(v, str):
                out |= set(NUMBER.findall(v))
    out |= {fmt_num(v) for v in extra} | {fmt_ratio(v).rstrip("×") for v in extra}
    return out


def assert_numbers_backed(body, allowed):
    for cells in body:
        for cell in cells:
            for number in NUMBER.findall(cell):
                assert number in allowed, f"{number!r} in {cell!r} is not backed by the file"


# ----------------------------------------------------------------------------- synthetic files

def bench_file(rng, shapes=((8192, 4096, 4096, 16), (8192, 4096, 14336, 16))):
    impls = ["lora_kernels", "lora_kernels_fa", "peft", "peft_fa", "torch_unfused", "base"]
    rows = []
    for M, K, N, r in shapes:
        times = {i: (rng.uniform(1, 9), rng.uniform(1, 9)) for i in impls}
        for impl in impls:
            fwd, bwd = times[impl]
            ref = "peft_fa" if impl.endswith("_fa") else "peft"
            rows.append({"shape": f"{M},{K},{N},{r}", "M": M, "K": K, "N": N, "r": r, "impl": impl,
                         "fwd_ms": fwd, "bwd_ms": bwd, "fwdbwd_ms": fwd + bwd,
                         "ratio_vs_base": (fwd + bwd) / sum(times["base"]),
                         "ratio_vs_peft": (fwd + bwd) / sum(times[ref]), "peft_ref": ref})
    return {"metadata": meta(), "config": {"reps": 30, "statistic": "median", "impls": impls},
            "ceilings": {"copy_GBps": 4321.9, "matmul_n": 8192, "matmul_TFLOPs": 701.23}, "rows": rows}


def qlora_file(rng):
    rows = []
    for K, N in ((4096, 4096), (4096, 14336)):
        for M in (1, 16, 4096):
            ref = {p: rng.uniform(0.1, 5) for p in ("fwd", "fwdbwd", "infer")}
            for impl in ("lora_kernels_nf4", "lora_kernels_nf4_fa", "peft_qlora", "bnb_matmul_4bit", "base_dense"):
                t = ref if impl == "peft_qlora" else {p: rng.uniform(0.1, 5) for p in ref}
                row = {"shape": f"{M},{K},{N},16", "M": M, "K": K, "N": N, "r": 16, "impl": impl,
                       "saved_bytes": M * K * 2}
                for p in ref:
                    row[f"{p}_ms"] = t[p]
                    row[f"{p}_vs_peft"] = t[p] / ref[p]
                rows.append(row)
    goals = {"checks": [{"goal": "fwdbwd_vs_peft", "shape": r["shape"], "ratio": r["fwdbwd_vs_peft"],
                         "max": 0.667, "met": r["fwdbwd_vs_peft"] <= 0.667}
                        for r in rows if r["impl"] == "lora_kernels_nf4"]}
    return {"metadata": meta(), "config": {"reps": 20, "statistic": "median"},
            "formats": {"4096,4096": {"bits_per_parameter": 4.127}}, "rows": rows, "goals": goals}


def memory_file(rng):
    rows = []
    for p in (0.0, 0.1):
        for impl in ("lora_kernels", "lora_kernels_fa", "peft", "base"):
            rows.append({"shape": "8192,4096,4096,16", "impl": impl, "dropout_p": p,
                         "activation_bytes": rng.randrange(0, 1 << 30),
                         "peak_fwdbwd_bytes": rng.randrange(1 << 30, 1 << 32)})
    return {"metadata": meta(), "rows": rows}


def aot_rows():
    rows = []
    for kernel, weights in (("lora_shrink_kernel", ("dense",)), ("lora_forward_gemm_kernel", ("dense", "nf4"))):
        for weight in weights:
            for R in (16, 128):
                for arch in ("sm_80", "sm_90"):
                    rows.append({"kernel": kernel, "R": R, "weight": weight, "arch": arch,
                                 "regs": 40 + R + len(weight) + (arch == "sm_90"), "stack": 0, "local": 0,
                                 "dynamic_shared": 1024 * (R + len(weight)), "static_shared": 512,
                                 "wgmma": arch == "sm_90" and R == 16, "error": None})
    rows[0]["error"] = "out of resources"          # shrink, R=16, sm_80
    rows[-1]["local"] = 64                          # forward nf4, R=128, sm_90: spill outside the main set
    rows[-3]["stack"] = 8                           # forward nf4, R=16, sm_90: spill in the main set
    return rows


def csrc_rows():
    rows = [{"file": "bindings.cpp", "arch": "host", "kernel": "-", "entry": None, "error": None}]
    for arch in ("sm_80", "sm_90"):
        for i in range(3):
            rows.append({"file": "gemv.cu", "arch": arch, "kernel": f"k{i}", "entry": True, "regs": 50 + 7 * i,
                         "smem": 1000 * (i + 1) + (arch == "sm_90"), "spill_stores": int(arch == "sm_90" and i == 2),
                         "spill_loads": 0, "error": None})
    return rows


# ----------------------------------------------------------------------------- renderers

def test_bench_cells_are_the_file_values(tmp_path):
    rng = random.Random(1)
    data = bench_file(rng)
    write(tmp_path, "nvidia-h200/bench_bfloat16.json", data)
    lines = section_of(report.generate(tmp_path), "bench_bfloat16.json")
    assert "NVIDIA H200" in lines[0] and "2026-12-01" in lines[0] and "abc1234" in lines[0]
    assert "torch 2.11.0+cu130" in lines[0] and "median of 30" in lines[0] and "interpreter" not in lines[0]
    body = table_bodies(lines)
    by = {(r["shape"], r["impl"]): r for r in data["rows"]}
    shapes = list(dict.fromkeys(r["shape"] for r in data["rows"]))
    assert [cells[0] for cells in body] == shapes
    impls = data["config"]["impls"]
    for cells in body:
        for impl, cell in zip(impls, cells[1:]):
            row = by[(cells[0], impl)]
            assert cell.startswith(fmt_num(row["fwdbwd_ms"]))
            if impl.startswith("lora_kernels"):
                assert f"{fmt_ratio(row['ratio_vs_base'])} base" in cell
                assert f"{fmt_ratio(row['ratio_vs_peft'])} PEFT" in cell
        fwd_ratio = by[(cells[0], "lora_kernels")]["fwd_ms"] / by[(cells[0], "base")]["fwd_ms"]
        assert cells[-1] == fmt_ratio(fwd_ratio)
    computed = [by[(s, "lora_kernels")]["fwd_ms"] / by[(s, "base")]["fwd_ms"] for s in shapes]
    assert_numbers_backed(body, backed_numbers(data["rows"], computed))


def test_bench_with_modes_and_more_rows_than_shown(tmp_path):
    rng = random.Random(2)
    data = bench_file(rng, shapes=[(M, 4096, 4096, 16) for M in range(1, 21)])
    for row in data["rows"]:
        row["mode"] = "train"
        row["fwdbwd_TFLOPs"] = rng.uniform(100, 900)
        row["weight_GBps"] = rng.uniform(100, 4000)
    write(tmp_path, "gpu/bench_bfloat16.json", data)
    lines = section_of(report.generate(tmp_path), "bench_bfloat16.json")
    assert "| lora_kernels fwd ÷ base fwd | lora_kernels fwdbwd_TFLOPs | lora_kernels weight_GBps |" in lines[4]
    body = table_bodies(lines)
    assert len(body) == report.MAX_TABLE_ROWS and all(cells[1] == "train" for cells in body)
    lk = [r for r in data["rows"] if r["impl"] == "lora_kernels"]
    assert [c[-2:] for c in body] == [[fmt_num(r["fwdbwd_TFLOPs"]), fmt_num(r["weight_GBps"])] for r in lk][:len(body)]
    assert f"({20 - report.MAX_TABLE_ROWS} more rows in the file.)" in lines


def test_qlora_cells_pair_lora_kernels_with_peft(tmp_path):
    rng = random.Random(3)
    data = qlora_file(rng)
    write(tmp_path, "gpu/bench_qlora_bfloat16.json", data)
    lines = section_of(report.generate(tmp_path), "bench_qlora_bfloat16.json")
    body = table_bodies(lines)
    ms = sorted({r["M"] for r in data["rows"]})
    assert [c[0] for c in body] == [str(M) for M in ms] * 2  # fwd+bwd table, then inference table
    by = {(r["M"], r["K"], r["N"], r["impl"]): r for r in data["rows"]}
    for table, phase in ((body[:len(ms)], "fwdbwd"), (body[len(ms):], "infer")):
        for cells in table:
            for (K, N), cell in zip(((4096, 4096), (4096, 14336)), cells[1:]):
                a, b = by[(int(cells[0]), K, N, "lora_kernels_nf4")], by[(int(cells[0]), K, N, "peft_qlora")]
                assert cell == (f"{fmt_num(a[phase + '_ms'])} vs {fmt_num(b[phase + '_ms'])} "
                                f"({fmt_ratio(a[phase + '_vs_peft'])})")
    assert_numbers_backed(body, backed_numbers(data["rows"]))
    checks = data["goals"]["checks"]
    assert any(f"{sum(c['met'] for c in checks)} of {len(checks)} met" in line for line in lines)
    assert any("4.127 at 4096×4096" in line for line in lines)
    saved = next(line for line in lines if line.startswith("Saved for backward"))
    for K, N in ((4096, 4096), (4096, 14336)):
        assert (f"at M=4096, K={K}, N={N}: lora_kernels NF4 {fmt_saved(4096 * K * 2)}, A frozen "
                f"{fmt_saved(4096 * K * 2)}, PEFT + bnb {fmt_saved(4096 * K * 2)}") in saved


def test_memory_cells_are_the_file_bytes(tmp_path):
    rng = random.Random(4)
    data = memory_file(rng)
    write(tmp_path, "gpu/memory_bfloat16.json", data)
    lines = section_of(report.generate(tmp_path), "memory_bfloat16.json")
    body = table_bodies(lines)
    impls = list(dict.fromkeys(r["impl"] for r in data["rows"]))
    assert len(body) == 2 * len(impls)  # saved activations, then CUDA peaks
    by = {(r["impl"], r["dropout_p"]): r for r in data["rows"]}
    for table, key, fmt in ((body[:len(impls)], "activation_bytes", fmt_saved),
                            (body[len(impls):], "peak_fwdbwd_bytes", fmt_bytes)):
        for impl, cells in zip(impls, table):
            assert cells[0] == report.IMPL_LABELS[impl]
            assert cells[1:] == [fmt(by[(impl, p)][key]) for p in (0.0, 0.1)]
    assert "| implementation | dropout 0 | dropout 0.1 |" in lines


def model_memory_rows(rng):
    rows = []
    for qlora in (False, True):
        for p in (0.0, 0.1):
            for variant in ("peft", "lora_kernels", "lora_kernels_fa"):
                rows.append({"label": f"{variant}/{qlora}/{p}", "variant": variant, "qlora": qlora, "dropout_p": p,
                             "saved_bytes": rng.randrange(1 << 20, 1 << 32),
                             "peak_bytes": rng.randrange(1 << 32, 1 << 35),
                             "layer_saved_bytes": [1, 2], "per_module": [{"name": "x"}]})
    for r in rows:
        ref = next(x for x in rows
                   if x["variant"] == "peft" and (x["qlora"], x["dropout_p"]) == (r["qlora"], r["dropout_p"]))
        r["ratio_vs_peft"] = r["saved_bytes"] / ref["saved_bytes"]
        r["peak_ratio_vs_peft"] = r["peak_bytes"] / ref["peak_bytes"]
    return rows


def test_model_memory_rows(tmp_path):
    rows = model_memory_rows(random.Random(5))
    cfg = {"preset": "1b", "batch": 4, "seq": 1024, "r": 16, "targets": ["q_proj", "v_proj"]}
    write(tmp_path, "gpu/memory_model_bfloat16.json", {"metadata": meta(), "config": cfg, "rows": rows,
                                                       "errors": {"peft/True/0.1": "OutOfMemoryError: x"}})
    lines = section_of(report.generate(tmp_path), "memory_model_bfloat16.json")
    assert "model `1b`, batch 4 × seq 1024, r 16, LoRA on 2 projections" in lines[2]
    assert table_bodies(lines) == [
        [r["variant"], "NF4 (QLoRA)" if r["qlora"] else "dense", fmt_param(r["dropout_p"]), fmt_saved(r["saved_bytes"]),
         fmt_ratio(r["ratio_vs_peft"]), fmt_bytes(r["peak_bytes"]), fmt_ratio(r["peak_ratio_vs_peft"])] for r in rows]
    assert [line for line in lines if line][-1] == "Not measured: peft/True/0.1 (OutOfMemoryError: x)."


def test_train_rows(tmp_path):
    rng = random.Random(6)
    rows = []
    for variant, ref in (("peft", "peft"), ("lora_kernels", "peft"), ("peft_qlora", "peft_qlora"),
                         ("lora_kernels_qlora", "peft_qlora")):
        rows.append({"variant": variant, "peft_ref": ref, "median_step_ms": rng.uniform(50, 500),
                     "tokens_per_s": rng.uniform(1e3, 1e5), "peak_bytes": rng.randrange(1 << 30, 1 << 35),
                     "final_loss": rng.uniform(5, 7), "max_loss_diff_vs_peft": rng.uniform(0, 1e-5),
                     "losses": [1.0, 2.0], "step_ms": [1.0]})
    by = {r["variant"]: r for r in rows}
    for r in rows:
        r["speedup_vs_peft"] = by[r["peft_ref"]]["median_step_ms"] / r["median_step_ms"]
        r["peak_ratio_vs_peft"] = r["peak_bytes"] / by[r["peft_ref"]]["peak_bytes"]
    goals = {"checks": [{"goal": "qlora_tokens_per_s_vs_peft", "ratio": by["lora_kernels_qlora"]["speedup_vs_peft"],
                         "min": 1.5, "met": by["lora_kernels_qlora"]["speedup_vs_peft"] >= 1.5}]}
    cfg = {"preset": "1b", "batch": 4, "seq": 1024, "r": 16, "dropout": 0.0, "steps": 20, "warmup_steps": 3,
           "statistic": "median"}
    write(tmp_path, "gpu/train_bfloat16.json", {"metadata": meta(), "config": cfg, "rows": rows, "goals": goals})
    lines = section_of(report.generate(tmp_path), "train_bfloat16.json")
    assert "median of 20" in lines[0]
    assert "20 timed steps after 3 warm-up" in lines[2]
    body = table_bodies(lines)
    assert body == [[r["variant"], fmt_num(r["median_step_ms"]), fmt_num(r["tokens_per_s"]),
                     fmt_ratio(r["speedup_vs_peft"]), fmt_bytes(r["peak_bytes"]), fmt_ratio(r["peak_ratio_vs_peft"]),
                     fmt_num(r["final_loss"]), fmt_num(r["max_loss_diff_vs_peft"])] for r in rows]
    met = int(goals["checks"][0]["met"])
    assert f"Goals checked in the file: {met} of 1 met (qlora_tokens_per_s_vs_peft {met} of 1)." in lines


def test_train_rows_show_the_gpu_busy_fraction_when_measured(tmp_path):
    rows = [{"variant": v, "peft_ref": "peft", "median_step_ms": ms, "tokens_per_s": 4096 / ms * 1e3,
             "speedup_vs_peft": 100.0 / ms, "peak_bytes": None, "final_loss": 6.0, "max_loss_diff_vs_peft": 0.0,
             "gpu_kernel_ms": busy * ms, "gpu_busy_fraction": busy, "losses": [1.0], "step_ms": [ms]}
            for v, ms, busy in (("peft", 100.0, 0.48), ("lora_kernels", 90.0, 0.55))]
    write(tmp_path, "gpu/train_bfloat16.json", {"metadata": meta(), "config": {"statistic": "median"}, "rows": rows})
    body = table_bodies(section_of(report.generate(tmp_path), "train_bfloat16.json"))
    assert [row[4] for row in body] == [fmt_num(0.48), fmt_num(0.55)]


def test_train_kernel_kinds_table_when_profiled(tmp_path):
    rng = random.Random(9)
    kinds = ["lora_kernels", "matmul", "other"]
    rows = [{"variant": v, "peft_ref": "peft", "median_step_ms": 100.0, "tokens_per_s": 4e4, "speedup_vs_peft": 1.0,
             "peak_bytes": None, "final_loss": 6.0, "max_loss_diff_vs_peft": 0.0, "losses": [1.0], "step_ms": [100.0],
             "gpu_kernel_ms": rng.uniform(50, 99), **{f"gpu_ms_{k}": rng.uniform(0, 40) for k in kinds}}
            for v in ("peft", "lora_kernels")]
    write(tmp_path, "gpu/train_bfloat16.json", {"metadata": meta(), "config": {"statistic": "median"}, "rows": rows})
    lines = section_of(report.generate(tmp_path), "train_bfloat16.json")
    assert "| variant | lora_kernels | matmul | other | total |" in lines
    assert table_bodies(lines)[-2:] == [[r["variant"]] + [fmt_num(r[f"gpu_ms_{k}"]) for k in kinds]
                                        + [fmt_num(r["gpu_kernel_ms"])] for r in rows]
    for r in rows:  # CPU runs: the fields are there, empty; no table
        for k in kinds:
            r[f"gpu_ms_{k}"] = None
    write(tmp_path, "gpu/train_bfloat16.json", {"metadata": meta(), "config": {"statistic": "median"}, "rows": rows})
    assert not any("by kind" in line for line in section_of(report.generate(tmp_path), "train_bfloat16.json"))


def test_train_rows_show_the_spread_of_the_timed_steps(tmp_path):
    rng = random.Random(8)
    rows = [{"variant": v, "peft_ref": "peft", "median_step_ms": 100.0, "tokens_per_s": 4e4, "speedup_vs_peft": 1.0,
             "peak_bytes": None, "final_loss": 6.0, "max_loss_diff_vs_peft": 0.0, "losses": [1.0],
             "step_ms": [rng.uniform(80, 200) for _ in range(7)]} for v in ("peft", "lora_kernels")]
    write(tmp_path, "gpu/train_bfloat16.json", {"metadata": meta(), "config": {"statistic": "median"}, "rows": rows})
    lines = section_of(report.generate(tmp_path), "train_bfloat16.json")
    assert "fastest–slowest step ms" in next(line for line in lines if line.startswith("| variant"))
    body = table_bodies(lines)
    assert [row[2] for row in body] == [f"{fmt_num(min(r['step_ms']))}–{fmt_num(max(r['step_ms']))}" for r in rows]
    assert [row[3] for row in body] == [fmt_num(4e4)] * 2  # the columns after it move over


def test_overhead_rows_one_per_shape_and_provider(tmp_path):
    rng = random.Random(7)
    rows = []
    for provider in ("peft", "lora_kernels"):
        for mode in ("infer", "fwd", "fwdbwd"):
            rows.append({"provider": provider, "M": 4, "K": 64, "N": 32, "mode": mode, "host_us": rng.uniform(50, 900),
                         "wall_us": rng.uniform(900, 1000), "launches": 0 if provider == "peft" else 5})
    by = {(r["provider"], r["mode"]): r for r in rows}
    for r in rows:
        r["host_vs_peft"] = r["host_us"] / by[("peft", r["mode"])]["host_us"]
    cfg = {"statistic": "best batch mean", "reps": 7, "dry_run": "launches recorded, not run"}
    write(tmp_path, "cpu/overhead_float32.json", {"metadata": meta(device="cpu-x"), "config": cfg, "rows": rows})
    lines = section_of(report.generate(tmp_path), "overhead_float32.json")
    body = table_bodies(lines)
    assert body == [["4×64×32", p] + [f"{fmt_num(by[(p, m)]['host_us'])} ({fmt_ratio(by[(p, m)]['host_vs_peft'])})"
                                      for m in ("infer", "fwd", "fwdbwd")]
                    + [fmt_num(by[(p, "fwdbwd")]["wall_us"]), fmt_num(by[(p, "fwdbwd")]["launches"])]
                    for p in ("peft", "lora_kernels")]
    assert any("launches recorded, not run" in line for line in lines)


def test_split_k_sweep(tmp_path):
    rng = random.Random(6)
    rows = [{"shape": f"{M},4096,4096,16", "weight": w, "M": M, "split_ms": rng.uniform(0.01, 1),
             "no_split_ms": rng.uniform(0.01, 1)} for M in (1, 16, 64) for w in ("nf4", "dense")]
    for r in rows:
        r["split_vs_no_split"] = r["split_ms"] / r["no_split_ms"]
    write(tmp_path, "gpu/split_k_bfloat16.json", {"metadata": meta(), "config": {"current_small_m_max": 16},
                                                  "rows": rows, "suggested_small_m_max": {"nf4": 64, "dense": 1}})
    lines = section_of(report.generate(tmp_path), "split_k_bfloat16.json")
    body = table_bodies(lines)
    assert body == [[r["shape"], r["weight"], fmt_num(r["split_ms"]), fmt_num(r["no_split_ms"]),
                     fmt_ratio(r["split_vs_no_split"])] for r in rows]
    assert any("dense 1, nf4 64" in line and "16" in line for line in lines)


def cpu_meta():
    return meta(device="AMD EPYC (cpu)", dtype="float32", device_type="cpu")


def time_values(rows) -> set:
    """Every absolute time or rate of ``rows`` as the renderer would format it."""
    return {fmt_num(v) for r in rows for k, v in r.items()
            if isinstance(v, float) and (k.endswith(("_ms", "_us", "TFLOPs", "GBps")) or k == "tokens_per_s")} | \
        {fmt_num(v) for r in rows for v in r.get("step_ms") or ()}


def assert_no_times(lines, rows):
    """No time of ``rows`` in the lines, and no time column."""
    times = time_values(rows)
    assert times
    for line in lines:
        assert not {tok.rstrip("×") for tok in NUMBER.findall(line)} & times - {"1.000"}, line
        assert not re.search(r"\b(ms|µs|tokens/s|TFLOP/s|GB/s)\b", line) or line.startswith("**["), line


def test_gemv_rows_times_only_from_a_gpu_and_unmeasured_goals(tmp_path):
    rows = [{"K": 64, "N": 32, "M": 1, "kernel": "simt", "gemv_lora_ms": 0.1234, "gemv_base_ms": 0.1125,
             "bnb_ms": None, "dense_ms": 0.2345, "copy_fraction": 0.5, "speedup_vs_bnb": None,
             "speedup_vs_dense": 1.9, "lora_overhead": 0.0969}]
    checks = [{"goal": "copy bandwidth", "met": False}, {"goal": "vs bitsandbytes", "met": None},
              {"goal": "vs dense", "met": False}, {"goal": "LoRA overhead", "met": False}]
    for folder, metadata in (("gpu", meta()), ("cpu", cpu_meta())):
        write(tmp_path, f"{folder}/gemv_float32.json", {"metadata": metadata, "rows": rows,
                                                         "goals": {"checks": checks, "device_type": metadata["device_type"]}})
    text = report.generate(tmp_path)
    gpu, cpu = (text.split("### ")[i] for i in (1, 2)) if "NVIDIA" in text.split("### ")[1] else \
        (text.split("### ")[i] for i in (2, 1))
    assert table_bodies(gpu.splitlines())[0][3:7] == ["0.1234", "0.1125", "–", "0.2345"]
    assert table_bodies(cpu.splitlines())[0] == ["64×32", "1", "simt", "0.5000", "–", "1.900", "0.0969"]
    assert "Ratios only" in cpu and "0.1234" not in cpu
    for section in (gpu, cpu):
        assert "0 of 4 met, 1 not measured" in section


def test_cpu_bench_shows_ratios_only(tmp_path):
    data = bench_file(random.Random(11))
    data["metadata"] = cpu_meta()
    for row in data["rows"]:
        row["fwdbwd_TFLOPs"] = 0.25
    write(tmp_path, "cpu/bench_float32.json", data)
    lines = section_of(report.generate(tmp_path), "bench_float32.json")
    assert "ceilings" not in lines[0] and "ratios only" in lines[2]
    body = table_bodies(lines)
    by = {(r["shape"], r["impl"]): r for r in data["rows"]}
    for cells in body:
        base = by[(cells[0], "base")]
        for impl, cell in zip(data["config"]["impls"], cells[1:]):
            row = by[(cells[0], impl)]
            if impl.startswith("lora_kernels"):
                ref = "PEFT A frozen" if impl.endswith("_fa") else "PEFT"
                assert cell == f"{fmt_ratio(row['ratio_vs_base'])} base, {fmt_ratio(row['ratio_vs_peft'])} {ref}"
            else:
                assert cell == fmt_ratio(row["fwdbwd_ms"] / base["fwdbwd_ms"])
        assert cells[-1] == fmt_ratio(by[(cells[0], "lora_kernels")]["fwd_ms"] / base["fwd_ms"])
    assert_no_times(lines[1:], data["rows"])


def test_cpu_qlora_train_overhead_split_k_show_ratios_only(tmp_path):
    rng = random.Random(12)
    qlora = qlora_file(rng)
    train_rows = [{"variant": v, "peft_ref": "peft", "median_step_ms": ms, "tokens_per_s": 4096 / ms * 1e3,
                   "speedup_vs_peft": 123.4 / ms, "peak_bytes": None, "final_loss": 6.5, "max_loss_diff_vs_peft": 2e-7,
                   "losses": [1.0], "step_ms": [ms * 0.97, ms, ms * 1.21]}
                  for v, ms in (("peft", 123.4), ("lora_kernels", 98.7))]
    overhead_rows = [{"provider": p, "M": 64, "K": 64, "N": 64, "mode": m, "host_us": us, "wall_us": us + 0.5,
                      "launches": 0 if p == "peft" else 5, "host_vs_peft": us / 211.1}
                     for p, us in (("peft", 211.1), ("lora_kernels", 345.6)) for m in ("infer", "fwdbwd")]
    split_rows = [{"shape": f"{M},128,64,16", "weight": "nf4", "M": M, "split_ms": 2.5 + M, "no_split_ms": 3.25 + M,
                   "split_vs_no_split": (2.5 + M) / (3.25 + M)} for M in (1, 16)]
    files = {"bench_qlora_float32.json": dict(qlora, metadata=cpu_meta()),
             "train_float32.json": {"metadata": cpu_meta(), "config": {"statistic": "median"}, "rows": train_rows},
             "overhead_float32.json": {"metadata": cpu_meta(), "config": {}, "rows": overhead_rows},
             "split_k_float32.json": {"metadata": cpu_meta(), "config": {}, "rows": split_rows}}
    for name, data in files.items():
        write(tmp_path, f"cpu/{name}", data)
    text = report.generate(tmp_path)
    for name, data in files.items():
        lines = section_of(text, name)
        assert any("ratios only" in line for line in lines), name
        assert_no_times(lines[1:], data["rows"])
    by = {(r["M"], r["N"], r["impl"]): r for r in qlora["rows"]}
    assert table_bodies(section_of(text, "bench_qlora_float32.json"))[0][1:] == \
        [fmt_ratio(by[(1, N, "lora_kernels_nf4")]["fwdbwd_vs_peft"]) for N in (4096, 14336)]
    assert table_bodies(section_of(text, "train_float32.json")) == [
        [r["variant"], fmt_ratio(r["speedup_vs_peft"]), fmt_ratio(1.21 / 0.97), fmt_num(6.5), fmt_num(2e-7)]
        for r in train_rows]
    assert table_bodies(section_of(text, "overhead_float32.json")) == [
        ["64×64×64", "peft", "1.000×", "1.000×", "0"],
        ["64×64×64", "lora_kernels", fmt_ratio(345.6 / 211.1), fmt_ratio(345.6 / 211.1), "5"]]
    assert table_bodies(section_of(text, "split_k_float32.json")) == [
        [r["shape"], "nf4", fmt_ratio(r["split_vs_no_split"])] for r in split_rows]


@pytest.mark.parametrize("wrapped", [True, False])
def test_aot_counts(tmp_path, wrapped):
    rows = aot_rows()
    data = {"meta": meta(device="AMD EPYC (cpu)", dtype=None, targets=["sm_80", "sm_90"]), "rows": rows} \
        if wrapped else rows  # older aot files are a bare list
    write(tmp_path, "aot/aot_sm80_sm90.json", data)
    md = report.generate(tmp_path)
    lines = section_of(md, "aot_sm80_sm90.json")
    body = {(c[0], c[1]): c[2:] for c in table_bodies(lines)}
    #            configs sm_80, sm_90, errors, max regs, max shared KiB, spills (main), wgmma on sm_90
    assert body[("lora_shrink_kernel", "dense")] == ["2", "2", "1", str(max(40 + R + 5 + 1 for R in (16, 128))),
                                                     fmt_num(128 + 5 + 0.5), "0 (0)", "1 of 2"]
    assert body[("lora_forward_gemm_kernel", "nf4")] == ["2", "2", "0", str(40 + 128 + 3 + 1), fmt_num(128 + 3 + 0.5),
                                                         "2 (1)", "1 of 2"]
    assert body[("**all**", "")][:3] == [str(len(rows) // 2), str(len(rows) // 2), "1"]
    assert body[("**all**", "")][5] == "2 (1)"
    assert len(body) == 4  # every (kernel, weight) group and the total
    if wrapped:
        assert "targets sm_80, sm_90" in lines[0]
    else:
        assert "No device/date metadata in the file" in lines[0]
        assert "Files without device/date metadata: `aot/aot_sm80_sm90.json`." in md


def test_aot_table_shows_every_kernel_and_format(tmp_path):
    rows = [{"kernel": f"k{i}_kernel", "R": 16, "weight": w, "arch": a, "regs": 40 + i, "stack": 0, "local": 0,
             "dynamic_shared": 0, "static_shared": 0, "wgmma": False, "error": None}
            for i in range(report.MAX_TABLE_ROWS) for w in ("dense", "nf4") for a in ("sm_80", "sm_90")]
    write(tmp_path, "aot/aot_sm80_sm90.json", {"meta": meta(device="AMD EPYC (cpu)"), "rows": rows})
    body = table_bodies(section_of(report.generate(tmp_path), "aot_sm80_sm90.json"))
    assert [c[:2] for c in body] == [[f"k{i}_kernel", w] for i in range(report.MAX_TABLE_ROWS)
                                     for w in ("dense", "nf4")] + [["**all**", ""]]


def test_csrc_counts(tmp_path):
    write(tmp_path, "csrc/csrc_check_sm80_sm90.json", {"meta": meta(dtype=None), "rows": csrc_rows()})
    lines = section_of(report.generate(tmp_path), "csrc_check_sm80_sm90.json")
    assert table_bodies(lines) == [["bindings.cpp", "host", "0", "0", "–", "–", "0"],
                                   ["gemv.cu", "sm_80", "3", "0", "64", "3000", "0"],
                                   ["gemv.cu", "sm_90", "3", "0", "64", "3001", "1"]]


# ----------------------------------------------------------------------------- nothing dropped

def test_unknown_unreadable_and_malformed_files_are_named(tmp_path):
    write(tmp_path, "gpu/roofline_bfloat16.json", {"metadata": meta(device="NVIDIA H100"), "rows": []})
    (tmp_path / "gpu" / "broken.json").write_text("{not json")
    write(tmp_path, "gpu/bench_bfloat16.json", {"metadata": meta(), "rows": [{"impl": "peft"}]})  # no shape
    md = report.generate(tmp_path)
    unknown = section_of(md, "roofline_bfloat16.json")
    assert [line for line in unknown if line] == unknown[:1]  # one line
    assert "NVIDIA H100" in unknown[0] and "2026-12-01" in unknown[0] and "no renderer" in unknown[0]
    assert "unreadable JSON" in section_of(md, "broken.json")[0]
    malformed = section_of(md, "bench_bfloat16.json")
    assert "Not summarised" in malformed[2] and "KeyError" in malformed[2]
    assert table_bodies(malformed) == [["peft"]]  # its columns as they are


def test_interpreter_runs_are_flagged(tmp_path):
    write(tmp_path, "cpu/bench_float32.json", bench_file(random.Random(14)) | {"metadata": meta(triton_interpret="1")})
    assert "Triton interpreter (TRITON_INTERPRET=1)" in section_of(report.generate(tmp_path), "bench_float32.json")[0]


def test_files_without_metadata_are_listed(tmp_path):
    write(tmp_path, "cpu/bench_float32.json", bench_file(random.Random(7)) | {"metadata": {"dtype": "float32"}})
    write(tmp_path, "cpu/notes.json", {"rows": []})
    md = report.generate(tmp_path)
    assert "Files without device/date metadata: `cpu/bench_float32.json`, `cpu/notes.json`." in md
    assert "Metadata without device or date" in section_of(md, "bench_float32.json")[0]
    assert "No device/date metadata in the file" in section_of(md, "notes.json")[0]
    assert table_bodies(section_of(md, "bench_float32.json"))  # the numbers still render, flagged


def test_groups_gpu_first_and_say_what_they_are(tmp_path):
    write(tmp_path, "aot/aot_sm80_sm90.json", {"meta": meta(device="AMD EPYC (cpu)"), "rows": aot_rows()})
    write(tmp_path, "cpu/memory_float32.json", memory_file(random.Random(8)) | {"metadata": meta("AMD EPYC (cpu)")})
    md = report.generate(tmp_path)
    assert "**No GPU results are committed**" in md
    write(tmp_path, "nvidia-h200/memory_bfloat16.json", memory_file(random.Random(9)))
    md = report.generate(tmp_path)
    headings = [line for line in md.splitlines() if line.startswith("### ")]
    assert headings == ["### GPU: `nvidia-h200/`", "### CPU: `cpu/`", "### Compile-only: `aot/`"]
    assert "No GPU results" not in md and "Measured on NVIDIA H200." in md
    assert "nothing here ran on a GPU" in md and "say nothing about GPU speed" in md


def test_output_is_deterministic_and_links_resolve_from_the_readme(tmp_path):
    write(tmp_path, "results/gpu/bench_bfloat16.json", bench_file(random.Random(10)))
    write(tmp_path, "results/cpu/memory_float32.json", memory_file(random.Random(11)))
    a = report.generate(tmp_path / "results", link_base=tmp_path)
    assert a == report.generate(tmp_path / "results", link_base=tmp_path)
    for link in re.findall(r"\]\(([^)]+)\)", a):
        assert (tmp_path / link).is_file()


# ----------------------------------------------------------------------------- README

README = "# Title\n\n## Results\n\nHand-written prose.\n\n{begin}\nstale text 1.23\n{end}\n\n## Layout\ntail\n"


def readme_with_markers(tmp_path) -> Path:
    path = tmp_path / "README.md"
    path.write_text(README.format(begin=BEGIN_MARKER, end=END_MARKER))
    return path


def test_replacement_keeps_the_rest_byte_identical(tmp_path):
    write(tmp_path, "results/gpu/bench_bfloat16.json", bench_file(random.Random(12)))
    readme = readme_with_markers(tmp_path)
    old = readme.read_text()
    assert report.main(["--results", str(tmp_path / "results"), "--readme", str(readme)]) == 0
    new = readme.read_text()
    head, tail = old.split(BEGIN_MARKER)[0], old.split(END_MARKER)[1]
    assert new.startswith(head + BEGIN_MARKER + "\n") and new.endswith(END_MARKER + tail)
    generated = new[len(head + BEGIN_MARKER + "\n"):-len(END_MARKER + tail)]
    assert generated == report.generate(tmp_path / "results", link_base=tmp_path)
    assert "stale text" not in new
    assert report.main(["--results", str(tmp_path / "results"), "--readme", str(readme)]) == 0
    assert readme.read_text() == new  # idempotent


@pytest.mark.parametrize("text", ["no markers at all\n", f"{BEGIN_MARKER}\nonly the start\n",
                                  f"{END_MARKER}\n{BEGIN_MARKER}\n",
                                  f"{BEGIN_MARKER}\n{END_MARKER}\n{BEGIN_MARKER}\n{END_MARKER}\n"])
def test_bad_markers_are_a_clear_error(tmp_path, capsys, text):
    (tmp_path / "results").mkdir()
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(ValueError, match="results:"):
        report.split_readme(text)
    assert report.main(["--results", str(tmp_path / "results"), "--readme", str(readme)]) == 2
    assert "readme:" in capsys.readouterr().err
    assert readme.read_text() == text


def test_missing_results_directory_is_a_clear_error(tmp_path, capsys):
    readme = readme_with_markers(tmp_path)
    assert report.main(["--results", str(tmp_path / "nowhere"), "--readme", str(readme)]) == 2
    assert "results: expected a directory" in capsys.readouterr().err


def test_check_detects_drift_and_writes_nothing(tmp_path, capsys):
    results = tmp_path / "results"
    data = bench_file(random.Random(13))
    write(results, "gpu/bench_bfloat16.json", data)
    readme = readme_with_markers(tmp_path)
    args = ["--results", str(results), "--readme", str(readme)]
    assert report.main(args + ["--check"]) == 1  # the stale text
    assert report.main(args) == 0
    assert report.main(args + ["--check"]) == 0
    capsys.readouterr()
    data["rows"][0]["fwdbwd_ms"] += 1.0  # a new measurement: the README no longer matches
    write(results, "gpu/bench_bfloat16.json", data)
    before = readme.read_text()
    assert report.main(args + ["--check"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("---") and fmt_num(data["rows"][0]["fwdbwd_ms"]) in out
    assert readme.read_text() == before


def test_number_formats():
    assert [fmt_num(v) for v in (1234.5, 123.45, 12.345, 1.2345, 0.012345, 7, None, float("nan"), True)] == \
        ["1234", "123.5", "12.35", "1.234", "0.0123", "7", "–", "–", "yes"]
    assert fmt_ratio(0.96083) == "0.961×" and fmt_param(0.1) == "0.1"
    assert [fmt_bytes(n) for n in (64, 16384, 3 * 2 ** 19, 2 ** 30)] == ["64 B", "16 KiB", "1.5 MiB", "1 GiB"]
    assert fmt_saved(2 ** 20 + 8) == "1 MiB + 8 B" and fmt_saved(8) == "8 B"


def test_readme_matches_committed_results():
    # Fails when benchmarks/results/ changed without `python -m lora_kernels.tools.report`.
    assert report.main(["--check", "--results", str(REPO / "benchmarks" / "results"),
                        "--readme", str(REPO / "README.md")]) == 0
