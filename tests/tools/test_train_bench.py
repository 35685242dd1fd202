"""Fast checks of the end-to-end training benchmark on the tiny built-in model (CPU: lora_kernels'
PyTorch path, bitsandbytes' CPU backend for the QLoRA rows). No assertion on speed."""
import argparse
import csv
import json
import math
import os
import sys

import pytest

from lora_kernels.tools import train_bench
from lora_kernels.tools.models import PRESETS, TARGETS

CFG = dict(device="cpu", dtype="fp32", preset="tiny", steps=2, warmup_steps=1, batch=1, seq=16, r=4)
LOSS_RTOL = 1e-5  # fp32, same weights, same batches: PEFT and patched agree to rounding


@pytest.fixture(autouse=True)
def torch_cpu_backend(monkeypatch):
    # conftest sets TRITON_INTERPRET=1, which makes the CPU default the interpreted Triton path;
    # the benchmark's CPU runs use the lean PyTorch path.
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "torch")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("LORA_KERNELS_CPU_BACKEND", "torch")
    out = tmp_path_factory.mktemp("train")
    try:
        res = train_bench.run(**CFG, out=out, verbose=False)
    finally:
        mp.undo()
    return res, out


def _projection_shapes(preset):
    """(in_features, out_features) of the seven projections of one layer of ``preset``."""
    c = PRESETS[preset]
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _close(a, b, rtol=LOSS_RTOL):
    return abs(a - b) <= rtol * abs(b)


def test_writes_files_with_metadata(result):
    res, out = result
    stem = out / "train_float32"
    for ext in ("json", "csv", "png"):
        assert stem.with_suffix(f".{ext}").stat().st_size > 0
    data = json.loads(stem.with_suffix(".json").read_text())
    for key in ("device", "torch", "triton", "bitsandbytes", "peft", "git_commit", "utc_date", "dtype"):
        assert key in data["metadata"]
    assert data["metadata"]["dtype"] == "float32"
    assert data["config"]["lora_kernels_backend"] == "torch"
    assert [r["variant"] for r in data["rows"]] == list(train_bench.VARIANTS)
    assert all(len(r["losses"]) == CFG["warmup_steps"] + CFG["steps"] for r in data["rows"])  # per-step losses
    with open(stem.with_suffix(".csv")) as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["variant"] for r in csv_rows] == list(train_bench.VARIANTS)
    assert set(csv_rows[0]) == set(train_bench.TRAIN_CSV_FIELDS)


def test_every_variant_ran_and_measured(result):
    res, _ = result
    assert res["skipped"] == {}  # bitsandbytes and peft are test dependencies: every row runs
    tokens = CFG["batch"] * CFG["seq"]
    for r in res["rows"]:
        assert len(r["step_ms"]) == CFG["steps"] and all(t > 0 for t in r["step_ms"])
        assert r["tokens_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(tokens / (r["median_step_ms"] / 1e3))
        assert all(math.isfinite(v) for v in r["losses"])
        assert r["peak_bytes"] is None and r["peak_ratio_vs_peft"] is None  # CPU: no allocator statistics
    rows = {r["variant"]: r for r in res["rows"]}
    for name, r in rows.items():
        ref = rows["peft_qlora" if r["family"] == "qlora" else "peft"]
        assert r["peft_ref"] == ref["variant"]
        assert r["speedup_vs_peft"] == pytest.approx(ref["median_step_ms"] / r["median_step_ms"])


def test_patched_rows_take_the_fast_path(result):
    # A patched row whose layers fell back to PEFT's forward would compare PEFT with itself.
    layers = PRESETS["tiny"]["num_hidden_layers"] * len(TARGETS)
    for r in result[0]["rows"]:
        if r["variant"].startswith("peft"):
            assert r["patched_layers"] == 0 and r["first_step_paths"] == {}
        else:
            assert r["patched_layers"] == layers
            assert r["first_step_paths"] == {"fast path": layers}  # one call per layer in step 1


def test_trainable_parameters(result):
    shapes = _projection_shapes("tiny").values()
    n_layers, r = PRESETS["tiny"]["num_hidden_layers"], CFG["r"]
    full = n_layers * sum(r * (k + n) for k, n in shapes)
    fa = n_layers * sum(r * n for _, n in shapes)  # LoRA-FA: lora_B [n, r] only
    for row in result[0]["rows"]:
        assert row["trainable_params"] == (fa if row["variant"].endswith("_fa") else full), row["variant"]


def test_losses_match_peft(result):
    rows = {r["variant"]: r for r in result[0]["rows"]}
    for peft_name, patched in (("peft", "lora_kernels"), ("peft_qlora", "lora_kernels_qlora")):
        ref, got = rows[peft_name]["losses"], rows[patched]["losses"]
        assert len(set(ref)) > 1  # the batches differ from step to step: the comparison is not vacuous
        for step, (a, b) in enumerate(zip(got, ref)):
            assert _close(a, b), (patched, step, a, b)
        assert rows[patched]["max_loss_diff_vs_peft"] == pytest.approx(max(abs(a - b) for a, b in zip(got, ref)),
                                                                       abs=0)
    for peft_name, fa in (("peft", "lora_kernels_fa"), ("peft_qlora", "lora_kernels_qlora_fa")):
        ref, got = rows[peft_name]["losses"], rows[fa]["losses"]
        assert _close(got[0], ref[0]), (fa, got[0], ref[0])  # same weights before the first update
        assert rows[fa]["first_loss_diff_vs_peft"] == abs(got[0] - ref[0])
    # The QLoRA model is a different model (NF4 base weights): its losses are its own.
    assert rows["peft_qlora"]["losses"][0] != rows["peft"]["losses"][0]


def test_goal_check_format(result):
    res, _ = result
    rows = {r["variant"]: r for r in res["rows"]}
    (check,) = res["goals"]["checks"]
    assert check["goal"] == "qlora_tokens_per_s_vs_peft" and check["min"] == 1.5
    assert check["ratio"] == rows["lora_kernels_qlora"]["speedup_vs_peft"]
    assert check["met"] == (check["ratio"] >= 1.5)
    assert res["goals"]["device_type"] == "cpu"


def test_check_goals_flags_misses():
    def rows(speedup):
        return [{"variant": "peft_qlora", "speedup_vs_peft": 1.0},
                {"variant": "lora_kernels_qlora", "speedup_vs_peft": speedup, "shape": "1b 4x1024"}]
    assert train_bench.check_goals(rows(1.6))[0]["met"] is True
    assert train_bench.check_goals(rows(1.4))[0]["met"] is False
    assert train_bench.check_goals(rows(1.6)[1:]) == []  # no PEFT QLoRA row: nothing to compare with
    # both asked for, one failed: the goal is there, not measured (neither met nor missed)
    (check,) = train_bench.check_goals(rows(1.6)[:1], requested=("peft_qlora", "lora_kernels_qlora"))
    assert check["ratio"] is None and check["met"] is None


def test_qlora_rows_skipped_without_bitsandbytes(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.warns(UserWarning, match="bitsandbytes unavailable"):
        res = train_bench.run(**{**CFG, "steps": 1, "warmup_steps": 0},
                              variants=("peft", "peft_qlora", "lora_kernels_qlora"), out=tmp_path, plot=False,
                              verbose=False)
    assert [r["variant"] for r in res["rows"]] == ["peft"]
    assert res["config"]["variants"] == ["peft"]
    assert res["goals"]["checks"] == []


@pytest.mark.parametrize("kwargs, name, exc", [
    (dict(steps=0), "steps", ValueError),
    (dict(steps=1.5), "steps", TypeError),
    (dict(warmup_steps=-1), "warmup_steps", ValueError),
    (dict(batch=0), "batch", ValueError),
    (dict(seq=1), "seq", ValueError),
    (dict(variants=("peft", "nope")), "variants", ValueError),
    (dict(variants=()), "variants", ValueError),
    (dict(lr=-1e-4), "lr", ValueError),
    (dict(lr=float("nan")), "lr", ValueError),
    (dict(dropout=1.0), "dropout", ValueError),
    (dict(r=0), "r", ValueError),
    (dict(preset="huge"), "preset", ValueError),
    (dict(dtype="int8"), "dtype", ValueError),
])
def test_invalid_arguments(kwargs, name, exc, tmp_path):
    with pytest.raises(exc, match=rf"^{name}\b"):
        train_bench.run(**{**CFG, **kwargs}, out=tmp_path, verbose=False)
    assert not any(tmp_path.iterdir())  # rejected before anything ran or was written


def test_format_losses_marks_warmup():
    rows = [{"variant": "peft", "losses": [1.0, 2.0, 3.0]}, {"variant": "lora_kernels", "losses": [1.0, 2.0]}]
    lines = train_bench.format_losses(rows, warmup_steps=1).splitlines()
    assert lines[2].split() == ["1w", "1.000000", "1.000000"]
    assert lines[4].split() == ["3", "3.000000", "-"]


def test_cli_main(tmp_path):
    train_bench.main(["--device", "cpu", "--steps", "1", "--warmup-steps", "0", "--batch", "1", "--seq", "8",
                      "--variants", "peft,lora_kernels", "--r", "2", "--no-plot", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "train_float32.json").read_text())
    assert not (tmp_path / "train_float32.png").exists()
    assert [r["variant"] for r in data["rows"]] == ["peft", "lora_kernels"]
    assert (data["config"]["preset"], data["config"]["r"], data["config"]["seq"]) == ("tiny", 2, 8)


def test_options_join_the_bench_parser():
    # `bench --train`: the training options are added to bench's parser, which already defines
    # --device, --dtype and --out; run_from_args reads them from there.
    from lora_kernels.tools import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    train_bench.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--dtype", "fp32", "--steps", "3", "--warmup-steps", "0",
                              "--variants", "peft_qlora,lora_kernels_qlora", "--lr", "0.001", "--r", "8", "--no-plot"])
    assert (args.device, args.dtype, args.steps, args.warmup_steps, args.lr, args.r) == ("cpu", "fp32", 3, 0, 1e-3, 8)
    assert args.no_plot
    assert args.variants == ["peft_qlora", "lora_kernels_qlora"]


def test_bench_train_subcommand(tmp_path, monkeypatch):
    """``python -m lora_kernels bench --train ...`` runs this benchmark with bench's --device/--dtype/--out."""
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "torch")
    from lora_kernels.__main__ import main
    main(["bench", "--train", "--device", "cpu", "--dtype", "fp32", "--steps", "1", "--warmup-steps", "0",
          "--batch", "1", "--seq", "8", "--variants", "peft,lora_kernels", "--r", "4", "--out", str(tmp_path),
          "--no-plot"])
    data = json.loads((tmp_path / "train_float32.json").read_text())
    assert [r["variant"] for r in data["rows"]] == ["peft", "lora_kernels"]
    assert not (tmp_path / "bench_float32.json").exists()  # the layer benchmark did not run


def test_dora_run(tmp_path):
    res = train_bench.run(**{**CFG, "steps": 1}, variants=["peft", "lora_kernels"], out=tmp_path, verbose=False,
                          dora=True, plot=False)
    rows = {r["variant"]: r for r in res["rows"]}
    assert res["config"]["dora"] is True and res["goals"]["checks"] == []
    assert _close(rows["lora_kernels"]["final_loss"], rows["peft"]["final_loss"])
    assert rows["lora_kernels"]["first_step_paths"] == {"fast path": 7 * PRESETS["tiny"]["num_hidden_layers"]}
    assert (tmp_path / "train_float32_dora.json").exists()


def test_opt_in_rows_run_their_route_on_cuda_only(monkeypatch, tmp_path):
    """The opt-in rows train with their dispatch switch set (and only while they train); off CUDA,
    where their routes do not exist, they are reported as skipped instead of repeating a default row."""
    import torch
    seen = {}

    def fake_train_variant(name, **kwargs):
        seen[name] = {v: os.environ.get(v) for spec in train_bench.OPT_IN_VARIANTS.values() for v in spec[2]}
        return {"losses": [1.0], "step_ms": [1.0], "peak_bytes": None, "trainable_params": 1, "patched_layers": 1,
                "first_step_paths": {}}
    monkeypatch.setattr(train_bench, "train_variant", fake_train_variant)
    for spec in train_bench.OPT_IN_VARIANTS.values():
        for variable in spec[2]:
            monkeypatch.delenv(variable, raising=False)
    names = ["peft", "lora_kernels", "lora_kernels_cublas"]
    res = train_bench.run(**{**CFG, "steps": 1, "warmup_steps": 0}, variants=names, out=tmp_path, plot=False,
                          verbose=False)
    assert [r["variant"] for r in res["rows"]] == ["peft", "lora_kernels"]
    assert "CUDA only" in res["skipped"]["lora_kernels_cublas"]
    assert train_bench.available_variants(["lora_kernels_qlora_cuda_decode", "lora_kernels_qlora_triton_decode"],
                                          torch.device("cpu"))[0] == []
    monkeypatch.setattr(train_bench, "available_variants", lambda variants, device: (list(variants), {}))
    names += ["peft_qlora", "lora_kernels_qlora", "lora_kernels_qlora_triton_decode", "lora_kernels_qlora_cuda_decode"]
    res = train_bench.run(**{**CFG, "steps": 1, "warmup_steps": 0}, variants=names, out=tmp_path, plot=False,
                          verbose=False)
    assert seen["lora_kernels_cublas"]["LORA_KERNELS_DENSE_CUBLAS_MIN_M"] == "1"
    assert seen["lora_kernels"]["LORA_KERNELS_DENSE_CUBLAS_MIN_M"] is None
    assert seen["lora_kernels_qlora_triton_decode"]["LORA_KERNELS_NF4_SLAB_DECODER"] == "triton"
    assert seen["lora_kernels_qlora_cuda_decode"]["LORA_KERNELS_NF4_SLAB_DECODER"] == "cuda"
    assert seen["lora_kernels_qlora"]["LORA_KERNELS_NF4_SLAB_DECODER"] is None  # the default row: auto
    for variable in ("LORA_KERNELS_DENSE_CUBLAS_MIN_M", "LORA_KERNELS_NF4_SLAB_DECODER"):
        assert os.environ.get(variable) is None  # restored
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == names and rows["lora_kernels_cublas"]["peft_ref"] == "peft"
    assert rows["lora_kernels_qlora_triton_decode"]["peft_ref"] == "peft_qlora"


# ----------------------------------------------------------------------------- GPU kernel kinds

# Kernel names as torch.profiler reports them on an H100/H200 (cuBLAS, bitsandbytes, PyTorch), and
# the kind each must get.
PROFILED_NAMES = {
    "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT": "matmul",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "matmul",
    "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8>(Params)": "matmul",
    "void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*, float*, __nv_bfloat16*, int, int)":
        "bitsandbytes",
    "void kgemm_4bit_inference_naive<__nv_bfloat16, 128, 16>(int, int, int, __nv_bfloat16*)": "bitsandbytes",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>, true>(Flash_fwd_params)":
        "attention",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, LogSoftMaxForwardEpilogue>":
        "loss",
    "void at::native::(anonymous namespace)::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>": "loss",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor>":
        "optimizer",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>": "other",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float>>>": "other",
    "void lora_kernels::nf4_gemv_lora_kernel<__nv_bfloat16, __nv_bfloat16, 1>(__nv_bfloat16 const*)": "lora_kernels",
    "void lora_kernels::nf4_dequantize_slab_kernel<__nv_bfloat16>(lora_kernels::NF4Args, __nv_bfloat16*)":
        "lora_kernels",
}


def test_kernel_kinds_of_profiled_names():
    ours = train_bench.our_kernel_names()
    for name, kind in PROFILED_NAMES.items():
        assert train_bench.kernel_category(name, ours) == kind, name
    # Our Triton kernels by their own names, before the generic "gemm" of the matmul kind.
    for name in ours:
        assert train_bench.kernel_category(name, ours) == "lora_kernels", name
    assert train_bench.kernel_category("lora_forward_gemm_kernel", frozenset()) == "matmul"


def test_our_kernel_names_cover_every_launched_kernel():
    from lora_kernels.kernels import configs
    from lora_kernels.tools import aot_check
    ours = train_bench.our_kernel_names()
    assert set(configs.KERNEL_CONFIGS) | set(aot_check.DECODE_KERNELS) <= ours
    assert all(name.endswith("_kernel") for name in ours)


def _random_kernels(rng, n):
    names = list(PROFILED_NAMES) + sorted(train_bench.our_kernel_names())
    return [(rng.choice(names), rng.uniform(1.0, 900.0)) for _ in range(n)]


def test_summarize_kernels_adds_up():
    import random
    rng = random.Random(11)
    kernels = _random_kernels(rng, 300)
    ours = train_bench.our_kernel_names()
    s = train_bench.summarize_kernels(kernels, ours, top=5)
    assert s["kernels_per_step"] == len(kernels)
    assert math.isclose(s["gpu_kernel_ms"], sum(us for _, us in kernels) / 1e3, rel_tol=1e-12)
    assert list(s["gpu_ms_by_category"]) == list(train_bench.CATEGORY_NAMES)
    for kind, ms in s["gpu_ms_by_category"].items():
        expected = sum(us for name, us in kernels if train_bench.kernel_category(name, ours) == kind) / 1e3
        assert math.isclose(ms, expected, rel_tol=1e-12, abs_tol=1e-15), kind
    totals = {}
    for name, us in kernels:
        totals.setdefault(name, []).append(us / 1e3)
    ranked = sorted(totals, key=lambda name: -sum(totals[name]))[:5]
    assert [t["name"] for t in s["top_kernels"]] == ranked
    for t in s["top_kernels"]:
        assert t["calls"] == len(totals[t["name"]]) and math.isclose(t["ms"], sum(totals[t["name"]]))
        assert t["category"] == train_bench.kernel_category(t["name"], ours)


def test_gpu_kernel_time_reads_the_cuda_events_of_the_profiled_step(monkeypatch):
    """The profiler glue on a machine without a GPU: a stand-in profiler yields CPU and CUDA events;
    only the CUDA ones count, and the step runs once inside the profile."""
    import random

    import torch
    import torch.profiler
    from torch.autograd import DeviceType

    rng = random.Random(12)
    kernels = _random_kernels(rng, 40)
    events = [argparse.Namespace(name=n, device_type=DeviceType.CUDA, device_time=us) for n, us in kernels]
    events += [argparse.Namespace(name="aten::mm", device_type=DeviceType.CPU, device_time=rng.uniform(1, 9))]
    calls = []

    class FakeProfile:
        def __init__(self, activities):
            assert activities == [torch.profiler.ProfilerActivity.CUDA]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            return events

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    got = train_bench.gpu_kernel_time(lambda: calls.append(1), torch.device("cuda"))
    assert calls == [1]
    assert got == train_bench.summarize_kernels(kernels, train_bench.our_kernel_names())


def test_format_table_shows_kernel_kinds_only_when_profiled(result):
    res, _ = result
    text = train_bench.format_table(res["rows"], res["metadata"], res["config"])
    assert "by kind" not in text  # CPU: nothing profiled
    import random
    rng = random.Random(13)
    rows = []
    for r in res["rows"]:
        s = train_bench.summarize_kernels(_random_kernels(rng, 50), train_bench.our_kernel_names())
        rows.append({**r, "gpu_kernel_ms": s["gpu_kernel_ms"], "top_kernels": s["top_kernels"],
                     **{f"gpu_ms_{k}": v for k, v in s["gpu_ms_by_category"].items()}})
    lines = train_bench.format_table(rows, res["metadata"], res["config"]).splitlines()
    start = lines.index("GPU kernel ms of one profiled step, by kind")
    assert lines[start + 1].split() == ["variant", *train_bench.CATEGORY_NAMES, "total"]
    for r, line in zip(rows, lines[start + 2:]):
        cells = line.split()
        assert cells[0] == r["variant"]
        assert [float(c) for c in cells[1:]] == pytest.approx(
            [r[f"gpu_ms_{k}"] for k in train_bench.CATEGORY_NAMES] + [r["gpu_kernel_ms"]], abs=0.006)
    assert any(r["top_kernels"][0]["name"][:90] in line for r in rows for line in lines)


def test_format_table_shows_times_only_from_a_gpu(result):
    res, _ = result
    rows = res["rows"]
    cpu = train_bench.format_table(rows, res["metadata"], res["config"]).splitlines()
    gpu = train_bench.format_table(rows, {**res["metadata"], "device_type": "cuda"}, res["config"]).splitlines()
    assert "step ms" not in cpu[2] and "tokens/s" not in cpu[2] and "ratios only" in cpu[0]
    assert "step ms" in gpu[2] and "tokens/s" in gpu[2]
    for r, line_cpu, line_gpu in zip(rows, cpu[3:], gpu[3:]):
        assert f"{r['tokens_per_s']:.1f}" in line_gpu and f"{r['tokens_per_s']:.1f}" not in line_cpu
        assert line_cpu.split()[1] == line_gpu.split()[3] == f"{r['speedup_vs_peft']:.3f}"
