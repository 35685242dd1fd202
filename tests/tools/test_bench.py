"""Fast checks of the microbenchmark tool on tiny shapes (under the Triton interpreter when no GPU):
option parsing, the written files, the consistency of every row's metrics with its own times,
progress lines, and how failing providers and bad options are handled."""
import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import re
import statistics
import time
from unittest import mock

import pytest
import torch

import lora_kernels
from lora_kernels.ops import triton_launch
from lora_kernels.tools import bench
from tests.helpers import GridRecorder, needs_interpreter_with_tma

# Tiny but not tile-aligned; K a multiple of 64 for the NF4 family (bitsandbytes' CPU path).
SHAPES = [(5, 128, 40, 4), (17, 128, 40, 4)]
DENSE = ["lora_kernels", "lora_kernels_fa", "peft", "torch_unfused", "base"]
NF4 = ["lora_kernels_nf4", "peft_qlora", "base_dense"]
PROGRESS = re.compile(r"^\[(\d+)/(\d+)\] (\d+)x(\d+) M=(\d+) r=(\d+) (\S+) (.*)$")


def parse(*argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def cases_of(args):
    kw = bench.sweep_kwargs(args)
    device, _ = bench.resolve_device_dtype(kw["device"])
    return bench.resolve_cases(device, bench.bench_grid, kw["shapes"], kw["models"], kw["projs"], kw["ms"],
                               kw["ranks"], kw["quick"])


def test_parse_shapes():
    assert bench.parse_shapes("1,2,3,4; 5,6,7,8;") == [(1, 2, 3, 4), (5, 6, 7, 8)]
    with pytest.raises(ValueError):
        bench.parse_shapes("1,2,3")


def test_llama3_projection_shapes():
    for model, cfg in bench.LLAMA3.items():
        h, kv, inter = cfg["hidden"], cfg["kv"], cfg["intermediate"]
        assert bench.model_shapes((model,)) == [(h, h), (h, kv), (h, inter), (inter, h)]
        assert bench.projection_kn(model, "down") == (inter, h)
    assert bench.LLAMA3["8b"] == {"hidden": 4096, "kv": 1024, "intermediate": 14336}
    assert bench.LLAMA3["70b"] == {"hidden": 8192, "kv": 1024, "intermediate": 28672}
    assert bench.shape_label(4096, 4096) == "8b q,o" and bench.shape_label(28672, 8192) == "70b down"
    assert bench.shape_label(40, 24) == ""


def test_default_grids():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    kns, ms = bench.bench_grid(cuda)
    assert len(kns) == 8 and set(kns) == set(bench.model_shapes(("8b", "70b")))
    assert ms == (16, 256, 4096, 8192)
    quick_kns, quick_ms = bench.bench_grid(cuda, quick=True)
    assert quick_kns == bench.model_shapes(("8b",)) and set(quick_ms) < set(ms)
    cpu_kns, cpu_ms = bench.bench_grid(cpu)
    assert all(K * N <= 2 ** 21 for K, N in cpu_kns) and max(cpu_ms) <= 1024
    assert [p for p in bench.resolve_providers(bench.DENSE, None, quick=True)] == \
        [p for p in bench.DENSE_PROVIDERS if p != "peft_compiled"]
    assert bench.resolve_providers(bench.DENSE, ["peft_compiled", "base_dense"], quick=True) == ["peft_compiled"]


def test_cli_parsing_builds_the_cases():
    args = parse("--device", "cpu", "--model", "8b", "--proj", "q,o,down", "--m", "16,256", "--rank", "16,64",
                 "--providers", "lora_kernels,base", "--modes", "fwd,fwdbwd", "--family", "dense")
    cases = cases_of(args)
    # q and o share (4096, 4096): two distinct shapes x two ranks x two M
    assert [(c.K, c.N, c.r, c.M) for c in cases] == [
        (K, N, r, M) for (K, N) in ((4096, 4096), (14336, 4096)) for r in (16, 64) for M in (16, 256)]
    assert cases[0].label == "8b q,o"
    kw = bench.sweep_kwargs(args)
    assert kw["providers"] == ["lora_kernels", "base"] and kw["modes"] == ["fwd", "fwdbwd"]
    assert args.family == ["dense"]
    # --impls is the old name of --providers
    assert parse("--impls", "peft,base").impls == parse("--providers", "peft,base").impls == ["peft", "base"]
    # --model all covers both models; --proj alone implies every model
    assert {(c.K, c.N) for c in cases_of(parse("--device", "cpu", "--model", "all", "--proj", "k"))} == \
        {(4096, 1024), (8192, 1024)}
    assert {(c.K, c.N) for c in cases_of(parse("--device", "cpu", "--proj", "gate"))} == {(4096, 14336), (8192, 28672)}
    # defaults: every family, the training modes, CPU grid on CPU
    default = parse("--device", "cpu")
    assert default.family == list(bench.FAMILIES) and default.modes == list(bench.MODES) and default.impls is None
    assert {(c.K, c.N) for c in cases_of(default)} == set(bench.CPU_KN)
    assert cases_of(parse("--device", "cpu", "--shapes", "3,64,8,2")) == [bench.Case(3, 64, 8, 2)]


@pytest.mark.parametrize("argv", [["--modes", "fwd,sideways"], ["--m", "16,0"], ["--m", "a"], ["--rank", ""],
                                  ["--proj", "q,lm_head"], ["--model", "7b"], ["--family", "int4"],
                                  ["--shapes", "1,2,3"]])
def test_cli_rejects_bad_options(argv, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert "error" in capsys.readouterr().err


def test_run_rejects_bad_options(tmp_path):
    kw = dict(device="cpu", out=tmp_path, verbose=False, plot=False)
    with pytest.raises(ValueError, match="providers"):
        bench.run(shapes=SHAPES, providers=["lora_kernels", "nope"], **kw)
    with pytest.raises(ValueError, match="modes"):
        bench.run(shapes=SHAPES, modes=["fwd", "back"], **kw)
    with pytest.raises(ValueError, match="families"):
        bench.run(shapes=SHAPES, families=["dense", "fp8"], **kw)
    with pytest.raises(ValueError, match="shapes"):
        bench.run(shapes=SHAPES, ms=[16], **kw)
    with pytest.raises(ValueError, match="ms"):
        bench.run(ms=[0], **kw)
    with pytest.raises(ValueError, match="models"):
        bench.run(models=["7b"], **kw)
    with pytest.raises(ValueError, match="providers"):  # an NF4 name for the dense family only
        bench.run(shapes=SHAPES, providers=["base_dense"], families=["dense"], **kw)
    with pytest.raises(ValueError, match="reps"):
        bench.run(shapes=SHAPES, reps=0, **kw)
    with pytest.raises(ValueError, match="impls"):
        bench.run(shapes=SHAPES, providers=["base"], impls=["base"], **kw)
    assert not any(tmp_path.iterdir())  # options are checked before anything runs


def check_rows_consistent(data, family):
    """Every row's ratios, TFLOP/s and GB/s agree with the times in the rows of its case."""
    rows = data["rows"]
    modes = data["config"]["modes"]
    by_case = {}
    for r in rows:
        by_case.setdefault(r["shape"], {})[r["impl"]] = r
    for shape, group in by_case.items():
        base = group.get(family.base)
        for name, r in group.items():
            case = bench.Case(r["M"], r["K"], r["N"], r["r"])
            assert r["family"] == family.name and r["label"] == case.label
            peft = group.get(family.peft_ref(name))
            assert r["base_ref"] == (family.base if base else None)
            assert r["peft_ref"] == (family.peft_ref(name) if peft else None)
            for m in modes:
                t = r[f"{m}_ms"]
                assert t > 0
                assert r[f"{m}_vs_base"] == pytest.approx(t / base[f"{m}_ms"]) if base else r[f"{m}_vs_base"] is None
                assert r[f"{m}_vs_peft"] == pytest.approx(t / peft[f"{m}_ms"]) if peft else r[f"{m}_vs_peft"] is None
                assert r[f"{m}_TFLOPs"] * t * 1e9 == pytest.approx(bench.flops(case, family, name, m))
                if r["M"] <= bench.WEIGHT_BOUND_M:
                    assert r[f"{m}_GBps"] > 0
                else:
                    assert r[f"{m}_GBps"] is None
            main = bench.main_mode(modes)
            assert r["ratio_vs_base"] == r[f"{main}_vs_base"] and r["ratio_vs_peft"] == r[f"{main}_vs_peft"]
            assert r["out_rel_err"] < 1e-5, name  # every row computes the layer it claims
        if base:
            assert base["fwd_vs_base"] == pytest.approx(1.0)
            M, K, N = base["M"], base["K"], base["N"]
            assert base["fwd_TFLOPs"] * base["fwd_ms"] * 1e9 == pytest.approx(2 * M * N * K)


def test_bench_both_families_quick_cpu_run(tmp_path, capsys):
    res = bench.run(shapes=SHAPES, device="cpu", dtype="fp32", reps=2, warmup=1, out=tmp_path,
                    providers=DENSE + NF4)
    assert set(res) == {"dense", "nf4"}
    captured = capsys.readouterr()
    for stem, family, providers in (("bench_float32", bench.DENSE, DENSE),
                                    ("bench_qlora_float32", bench.get_family("nf4"), NF4)):
        for ext in ("json", "csv", "png"):
            assert (tmp_path / f"{stem}.{ext}").stat().st_size > 0
        data = json.loads((tmp_path / f"{stem}.json").read_text())
        meta = data["metadata"]
        for key in ("device", "torch", "triton", "bitsandbytes", "peft", "git_commit", "utc_date", "dtype"):
            assert key in meta
        assert meta["dtype"] == "float32" and meta["device"].endswith("(cpu)")
        assert data["config"]["family"] == family.name and data["config"]["impls"] == providers
        assert data["config"]["modes"] == list(bench.MODES) and "2MNK" in data["config"]["flops"]
        assert data["rows"] == res[family.name]["rows"]
        # every (case, provider) is measured or reported as failed, never lost; nothing fails here
        assert not data["skipped"], data["skipped"]
        assert [(r["shape"], r["impl"]) for r in data["rows"]] == [
            (",".join(map(str, s)), p) for s in SHAPES for p in providers]
        check_rows_consistent(data, family)
        with open(tmp_path / f"{stem}.csv") as f:
            table = list(csv.DictReader(f))
        assert list(table[0]) == bench.csv_fields(bench.MODES, family.extra_fields)
        assert [(t["shape"], t["impl"]) for t in table] == [(r["shape"], r["impl"]) for r in data["rows"]]
        assert float(table[0]["fwd_ms"]) == pytest.approx(data["rows"][0]["fwd_ms"])
        # one progress line per (case, provider), numbered 1..n, with the provider's times
        lines = [m for m in map(PROGRESS.match, captured.err.splitlines()) if m and m.group(7) in providers]
        n = len(SHAPES) * len(providers)
        assert [int(m.group(1)) for m in lines] == list(range(1, n + 1)) and {int(m.group(2)) for m in lines} == {n}
        for m in lines:
            row = next(r for r in data["rows"] if (r["M"], r["impl"]) == (int(m.group(5)), m.group(7)))
            assert m.group(8) == "measured" and row["fwd_ms"] > 0  # no absolute times without a GPU
        assert f"wrote {tmp_path}/{stem}" in captured.out


def test_quiet_run_prints_nothing_and_modes_subset(tmp_path, capsys):
    res = bench.run(shapes=SHAPES * 3, device="cpu", reps=1, warmup=0, out=tmp_path, providers=["base", "peft"],
                    modes=["infer", "fwd"], verbose=False, plot=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    data = res["dense"]
    assert data["config"]["modes"] == ["infer", "fwd"] and not (tmp_path / "bench_float32.png").exists()
    assert all("bwd_ms" not in r and r["infer_ms"] > 0 for r in data["rows"])
    check_rows_consistent(data, bench.DENSE)
    assert data["rows"][0]["ratio_vs_base"] == data["rows"][0]["infer_vs_base"]  # no fwdbwd: first mode


def test_failing_providers_are_reported_and_skipped(tmp_path, monkeypatch, capsys):
    def broken_peft(*args, **kwargs):
        raise RuntimeError("peft layer cannot be built")

    monkeypatch.setattr(bench, "_peft_linear", broken_peft)

    def build(problem, names):
        out = bench.build_impls(problem, [n for n in names if n != "torch_unfused"])
        if "torch_unfused" in names:
            def fails():
                raise ValueError("unfused exploded")
            out["torch_unfused"] = bench.Impl("torch_unfused", fails, [problem.x])
        return out

    family = dataclasses.replace(bench.DENSE, build=build)
    cases = [bench.Case(*s) for s in SHAPES]
    providers = ["lora_kernels", "peft", "torch_unfused", "base"]
    with pytest.warns(UserWarning, match="failed"):
        res = bench.run_family(family, cases, "cpu", torch.float32, providers, bench.MODES,
                               bench.default_timing(reps=1, warmup=0), tmp_path, plot=False)
    for c in cases:
        errs = res["skipped"][c.shape]
        assert set(errs) == {"peft", "torch_unfused"}
        assert "peft layer cannot be built" in errs["peft"] and "unfused exploded" in errs["torch_unfused"]
    assert {r["impl"] for r in res["rows"]} == {"lora_kernels", "base"}
    assert all(r["ratio_vs_peft"] is None and r["peft_ref"] is None for r in res["rows"])
    out = capsys.readouterr()
    assert "skipped: RuntimeError: peft layer cannot be built" in out.err  # progress line
    assert "skipped torch_unfused at 5,128,40,4: ValueError: unfused exploded" in out.out
    saved = json.loads((tmp_path / "bench_float32.json").read_text())
    assert saved["skipped"] == res["skipped"]


def test_cli_subset(tmp_path):
    from lora_kernels.__main__ import main

    main(["bench", "--device", "cpu", "--shapes", "17,16,8,2", "--reps", "1", "--warmup", "0",
          "--impls", "lora_kernels,base", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench_float32.json").read_text())["rows"]
    assert [r["impl"] for r in rows] == ["lora_kernels", "base"]
    assert rows[0]["ratio_vs_peft"] is None  # no PEFT row asked for
    assert not (tmp_path / "bench_qlora_float32.json").exists()  # no NF4 provider asked for


def test_rotation_copies(monkeypatch):
    assert bench.rotation_copies(1 << 10, "cpu") == 1
    l2 = 50 << 20
    monkeypatch.setattr(bench, "l2_cache_bytes", lambda device: l2)
    for nbytes in (l2 // 7, l2 // 2 + 1, l2 - 1):
        n = bench.rotation_copies(nbytes, "cuda")
        assert n * nbytes >= 2 * l2 and (n - 1) * nbytes < 2 * l2
    assert bench.rotation_copies(l2, "cuda") == 1 and bench.rotation_copies(3 * l2, "cuda") == 1
    assert bench.rotation_copies(1, "cuda") == bench.ROTATION_MAX_COPIES


def test_rotation_cycles_and_releases_results():
    p = [bench.make_problem(3, 16, 8, 2, "cpu", torch.float32, seed=s) for s in range(3)]
    impls = [bench.build_impls(q, ["base"])["base"] for q in p]
    dy = torch.ones(3, 8)
    rot = bench._Rotation([(i, dy) for i in impls])
    fwd = bench.mode_callable(rot, "fwd")
    seen = []
    for _ in range(4):
        fwd()
        seen.append(rot.last)
    assert [torch.equal(s, torch.nn.functional.linear(q.x, q.weight)) for s, q in zip(seen, p + p[:1])] == [True] * 4
    rot.grad = None  # what do_bench's grad_to_none does before each timed call
    assert rot.last is None
    step = bench.mode_callable(rot, "fwdbwd", reset_grads=True)
    for _ in range(2 * len(p)):
        step()
    for q in p:  # reset before each call: one step's gradient, not an accumulation
        assert torch.allclose(q.x.grad, dy @ q.weight)
    with pytest.raises(ValueError, match="bwd"):
        bench.mode_callable(rot, "bwd")


def test_flop_rule():
    c = bench.Case(8, 64, 32, 4)
    M, K, N, r = c.M, c.K, c.N, c.r
    fam = bench.DENSE
    assert bench.flops(c, fam, "base", "fwdbwd") == 2 * (2 * M * N * K)  # W frozen: fwd + dX only
    assert bench.flops(c, fam, "lora_kernels", "fwd") - bench.flops(c, fam, "base", "fwd") == 2 * M * r * (K + N)
    # LoRA-FA skips dA only
    assert bench.flops(c, fam, "peft", "bwd") - bench.flops(c, fam, "peft_fa", "bwd") == 2 * M * K * r
    assert bench.flops(c, fam, "peft", "fwdbwd") == bench.flops(c, fam, "peft", "fwd") + bench.flops(c, fam, "peft", "bwd")
    assert math.isclose(bench.flops(c, fam, "peft", "infer"), bench.flops(c, fam, "peft", "fwd"))


def test_prepare_call(monkeypatch):
    case = bench.Case(4, 64, 16, 2)
    for mode in ("fwd", "fwdbwd", "infer"):
        bench.prepare_call(bench.DENSE, case, "torch_unfused", mode, "cpu", torch.float32)()
    with pytest.raises(ValueError, match="provider"):
        bench.prepare_call(bench.DENSE, case, "lora_kernels_nf4", "fwd")

    def build(problem, names):
        def fails():
            raise ValueError("no")
        return {n: bench.Impl(n, fails, [problem.x]) for n in names}

    with pytest.raises(RuntimeError, match="base failed at M,K,N,r=4,64,16,2"):
        bench.prepare_call(dataclasses.replace(bench.DENSE, build=build), case, "base", "fwd")


def test_peft_compiled_provider(tmp_path):
    import shutil

    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    cases = [bench.Case(5, 64, 24, 4), bench.Case(9, 64, 24, 4), bench.Case(5, 128, 40, 4)]
    res = bench.run_family(bench.DENSE, cases, "cpu", torch.float32, ["peft", "peft_compiled"], ("fwd", "fwdbwd"),
                           bench.default_timing(reps=1, warmup=1), tmp_path, plot=False, verbose=False)
    assert not res["skipped"], res["skipped"]
    rows = [r for r in res["rows"] if r["impl"] == "peft_compiled"]
    assert [r["shape"] for r in rows] == [c.shape for c in cases]
    assert all(r["out_rel_err"] < 1e-5 and r["peft_ref"] == "peft" for r in rows)


def test_cuda_timer_plumbing_with_cpu_stand_ins(monkeypatch):
    """The CUDA timer's plumbing (rotation over copies, gradient reset, release of results, the bwd
    sampler) with CUDA events, synchronisation and do_bench replaced by CPU stand-ins (no GPU here;
    nothing about speed is checked)."""
    import triton.testing

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    seen = {}

    def do_bench(fn, warmup, rep, grad_to_none, return_mode):
        assert return_mode == "median" and warmup == 0.0 and rep == 1.0
        rots = [t for t in grad_to_none if isinstance(t, bench._Rotation)]
        assert len(rots) == 1
        seen.setdefault("calls", []).append((rots[0], {id(t) for t in grad_to_none}))
        fn()
        times = []
        for _ in range(3):
            for t in grad_to_none:  # what triton's do_bench does before every timed call
                t.grad = None
            assert rots[0].last is None  # the previous result was released outside the timed call
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(bench, "L2_FLUSH_BYTES", 1 << 10)

    problems = [bench.make_problem(4, 32, 16, 2, "cpu", torch.float32, seed=s) for s in range(3)]
    calls = [0] * len(problems)
    copies = []
    for i, p in enumerate(problems):
        built = bench.build_impls(p, ["lora_kernels_fa", "base"])
        for impl in built.values():
            def counted(f=impl.forward, i=i):
                calls[i] += 1
                return f()
            impl.forward = counted
        copies.append(built)
    dys = [torch.randn(4, 16) for _ in problems]
    timing = bench.default_timing(rep_ms=1.0, warmup_ms=0.0)
    done = []
    med = bench._measure_cuda(copies, dys, bench.ALL_MODES, timing, on_done=lambda n, t: done.append(n))
    assert done == ["lora_kernels_fa", "base"]
    assert all(med[n][m] > 0 for n in med for m in bench.ALL_MODES)
    assert all(c > 0 for c in calls)  # every copy was used
    assert len(seen["calls"]) == 2 * 3  # (fwd, fwdbwd, infer) x 2 providers through do_bench
    for rot, leaves in seen["calls"]:  # one provider rotating over every copy; grads of all reset
        impls = [impl for impl, _ in rot.pairs]
        assert len({impl.name for impl in impls}) == 1
        assert [id(impl) for impl in impls] == [id(c[impls[0].name]) for c in copies]
        assert {id(t) for impl in impls for t in impl.leaves} <= leaves
    for c in copies:  # no gradient left behind
        assert all(t.grad is None for impl in c.values() for t in impl.leaves)


def test_transposed_weight_provider_holds_conv1d_layout():
    """lora_kernels_wt stores the base weight [K, N] (as transformers' Conv1D does) and calls the
    kernels with its transposed view, not a copy: the same function as lora_kernels."""
    p = bench.make_problem(7, 24, 40, 4, "cpu", torch.float32, seed=3)
    seen = []
    real = lora_kernels.lora_linear
    with mock.patch.object(lora_kernels, "lora_linear", lambda x, W, *a, **k: seen.append(W) or real(x, W, *a, **k)):
        impls = bench.build_impls(p, ["lora_kernels", "lora_kernels_wt"])  # binds the recording function
        y = impls["lora_kernels_wt"].forward()
    W_kn = impls["lora_kernels_wt"].params[0]
    assert W_kn.shape == (24, 40) and W_kn.is_contiguous() and torch.equal(W_kn.t(), p.weight)
    assert seen[0].data_ptr() == W_kn.data_ptr() and seen[0].stride() == (1, 40)
    torch.testing.assert_close(y, impls["lora_kernels"].forward(), rtol=1e-6, atol=1e-6)


def test_lora_variant_providers(tmp_path):
    """DyLoRA (rank r of a 2r adapter, strided views), AdaLoRA (E folded into A) and DoRA (PEFT's and
    patched, magnitude at its initial value) compute the same function as plain lora_kernels and
    report their cost over it; their sweep gets its own file."""
    res = bench.run(shapes=SHAPES, device="cpu", reps=2, warmup=0, out=tmp_path, families=["dense"],
                    providers=["lora_kernels", *bench.VARIANT_PROVIDERS, "base"], verbose=False, plot=False)
    data = res["dense"]
    assert (tmp_path / "bench_variants_float32.json").exists() and not (tmp_path / "bench_float32.json").exists()
    check_rows_consistent(data, bench.DENSE)
    for shape in {r["shape"] for r in data["rows"]}:
        rows = {r["impl"]: r for r in data["rows"] if r["shape"] == shape}
        assert set(rows) == {"lora_kernels", *bench.VARIANT_PROVIDERS, "base"}
        for v in bench.VARIANT_PROVIDERS:
            assert rows[v]["out_rel_err"] < 1e-5
            assert rows[v]["ratio_vs_lora_kernels"] == pytest.approx(
                rows[v]["fwdbwd_ms"] / rows["lora_kernels"]["fwdbwd_ms"])
        assert "ratio_vs_lora_kernels" not in rows["lora_kernels"]
        # DoRA: the patched PEFT DoRA layer against PEFT's own
        assert rows["lora_kernels_dora"]["peft_ref"] == "peft_dora"
        assert rows["lora_kernels_dora"]["ratio_vs_peft"] == pytest.approx(
            rows["lora_kernels_dora"]["fwdbwd_ms"] / rows["peft_dora"]["fwdbwd_ms"])
    with pytest.raises(ValueError, match="providers"):
        bench.run(shapes=SHAPES, device="cpu", out=tmp_path, families=["nf4"], providers=["lora_kernels_dylora"])


def test_goal_check_bounds():
    assert bench.goal_check("g", "s", 1.0, max=1.0)["met"] is True
    assert bench.goal_check("g", "s", 1.0, max=1.0, strict=True)["met"] is False
    assert bench.goal_check("g", "s", 0.99, max=1.0, strict=True)["met"] is True
    assert bench.goal_check("g", "s", 1.4, min=1.5)["met"] is False
    assert bench.goal_check("g", "s", 1.5, min=1.5)["met"] is True
    unmeasured = bench.goal_check("g", "s", None, min=1.5, device="cpu")
    assert unmeasured["met"] is None and unmeasured["device"] == "cpu" and unmeasured["min"] == 1.5
    for bad in (dict(), dict(max=1.0, min=0.5)):
        with pytest.raises(ValueError, match="exactly one"):
            bench.goal_check("g", "s", 1.0, **bad)


def _goal_row(M, K, N, r, **ratios):
    return {"impl": "lora_kernels", "shape": f"{M},{K},{N},{r}", "M": M, "K": K, "N": N, "r": r, **ratios}


def test_dense_goals_cpu_case():
    M, K, N, r = bench.CPU_GOAL_CASES[0]
    rows = [_goal_row(M, K, N, r, fwdbwd_vs_base=1.08, fwdbwd_vs_peft=0.93),
            _goal_row(16, K, N, r, fwdbwd_vs_base=3.0, fwdbwd_vs_peft=2.0),  # not a goal case
            {**_goal_row(M, K, N, r, fwdbwd_vs_base=1.0, fwdbwd_vs_peft=1.0), "impl": "peft"}]
    checks = bench.check_dense_goals(rows, "cpu", "float32")
    assert [(c["goal"], c["met"], c["device"]) for c in checks] == [("fwdbwd_vs_base", True, "cpu"),
                                                                     ("fwdbwd_vs_peft", True, "cpu")]
    missed = bench.check_dense_goals([_goal_row(M, K, N, r, fwdbwd_vs_base=1.12, fwdbwd_vs_peft=1.0)], "cpu", "float32")
    assert [c["met"] for c in missed] == [False, False]  # "beat PEFT": a tie is a miss
    assert bench.check_dense_goals(rows, "cpu", "bfloat16") == []  # the CPU goal is an fp32 goal
    text = bench.format_goals("fused LoRA goals", {"checks": missed, "device_type": "cpu"})
    assert text.startswith("fused LoRA goals: 0 of 2 met") and "GPU goals" not in text
    assert "fwdbwd_vs_peft" in text and "(goal < 1.000)" in text


def test_dense_goals_gpu_cases():
    rows = [_goal_row(8192, K, N, 16, fwd_vs_base=1.04, fwdbwd_vs_peft=0.6) for K, N in bench.DENSE_GOALS["cuda"]["kn"]]
    rows.append(_goal_row(8192, 4096, 1024, 16, fwd_vs_base=2.0, fwdbwd_vs_peft=1.0))  # k/v: not a goal shape
    rows.append(_goal_row(4096, 4096, 4096, 16, fwd_vs_base=2.0, fwdbwd_vs_peft=1.0))  # not the goal M
    rows[0]["fwdbwd_vs_peft"] = 0.7  # 1.43x faster: short of 1.5x
    checks = bench.check_dense_goals(rows, "cuda", "bfloat16")
    assert len(checks) == 6 and sum(c["met"] for c in checks) == 5
    assert bench.check_dense_goals(rows, "cuda", "float32") == []
    # a CPU run with GPU-goal checks says so; a mode not measured gives no check
    assert "GPU goals" in bench.format_goals("t", {"checks": checks, "device_type": "cpu"})
    fwd_only = [_goal_row(8192, 4096, 4096, 16, fwd_vs_base=1.0)]
    assert [c["goal"] for c in bench.check_dense_goals(fwd_only, "cuda", "bfloat16")] == ["fwd_vs_base"]


def test_goal_of_a_case_whose_row_failed_counts_as_not_measured():
    """lora_kernels failed at 2 of the 3 GPU goal shapes: the goals stay 6 checks, 4 not measured, and
    neither the summary nor the README line calls them met or missed."""
    kns = bench.DENSE_GOALS["cuda"]["kn"]
    shapes = [f"8192,{K},{N},16" for K, N in kns]
    rows = [{**_goal_row(8192, *kns[0], 16, fwd_vs_base=1.04, fwdbwd_vs_peft=0.6)},
            *({**_goal_row(8192, K, N, 16), "impl": "peft"} for K, N in kns[1:])]
    result = {"metadata": {"device_type": "cuda", "dtype": "bfloat16"}, "rows": rows,
              "config": {"impls": ["lora_kernels", "peft"], "modes": ["fwd", "fwdbwd"]},
              "skipped": {shapes[1]: {"lora_kernels": "RuntimeError: x"}}, "not_applicable": {}}
    bench._dense_finalize(result)
    checks = result["goals"]["checks"]
    assert [(c["shape"], c["met"]) for c in checks] == [(shapes[0], True), (shapes[0], True)] + [
        (s, None) for s in shapes[1:] for _ in range(2)]
    text = bench.format_goals("fused LoRA goals", result["goals"])
    assert text.startswith("fused LoRA goals: 2 of 6 met, 4 not measured") and "NOT met" not in text
    assert text.count("not measured") == 5
    from lora_kernels.tools import report
    assert report._goal_line(result["goals"]) == [
        "Goals checked in the file: 2 of 6 met, 4 not measured (fwd_vs_base 1 of 3, 2 not measured; "
        "fwdbwd_vs_peft 1 of 3, 2 not measured)."]
    # a provider not asked for adds nothing
    result["config"]["impls"] = ["peft"]
    assert bench.unmeasured_rows(result, "lora_kernels") == []


def test_default_cpu_sweep_adds_the_goal_case(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "CPU_KN", ((32, 16),))
    monkeypatch.setattr(bench, "CPU_M", (3,))
    monkeypatch.setattr(bench, "CPU_GOAL_CASES", ((5, 32, 24, 4),))
    assert bench.default_extra_cases(torch.device("cpu"), quick=True) == []
    assert bench.default_extra_cases(torch.device("cuda")) == []
    res = bench.run(device="cpu", reps=1, warmup=0, out=tmp_path, providers=["lora_kernels", "peft", "base"],
                    families=["dense"], verbose=False, plot=False)["dense"]
    assert sorted({r["shape"] for r in res["rows"]}) == ["3,32,16,16", "5,32,24,4"]
    # an explicit selection is taken as given
    res = bench.run(device="cpu", ms=[3], reps=1, warmup=0, out=tmp_path, providers=["base"], families=["dense"],
                    verbose=False, plot=False)["dense"]
    assert {r["shape"] for r in res["rows"]} == {"3,32,16,16"}


def test_with_env_sets_and_restores(monkeypatch):
    monkeypatch.delenv("LORA_KERNELS_TEST_VAR", raising=False)
    seen = []
    bench.with_env("LORA_KERNELS_TEST_VAR", 7, lambda: seen.append(os.environ["LORA_KERNELS_TEST_VAR"]))()
    assert seen == ["7"] and "LORA_KERNELS_TEST_VAR" not in os.environ
    monkeypatch.setenv("LORA_KERNELS_TEST_VAR", "old")
    with pytest.raises(RuntimeError):
        bench.with_env("LORA_KERNELS_TEST_VAR", 1, lambda: (_ for _ in ()).throw(RuntimeError()))()
    assert os.environ["LORA_KERNELS_TEST_VAR"] == "old"


@pytest.mark.parametrize("not_applicable, r, other_misses", [
    # each variant's own limits: the one-launch forward's M and rank, the TMA GEMMs' row alignment
    (bench.fused_forward_not_applicable, 16, [(bench.Case(16, 4096, 4096, 16), "small-M"),
                                              (bench.Case(4096, 4096, 4096, 64), "rank")]),
    (bench.tma_not_applicable, 64, [(bench.Case(4096, 4100, 4096, 16), "aligned")]),
])
def test_forward_variant_rows_apply_where_their_kernel_runs(monkeypatch, not_applicable, r, other_misses):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    case = bench.Case(4096, 4096, 4096, r)
    assert "sm_90" in not_applicable(case, cpu, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "sm_90" in not_applicable(case, cuda, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert not_applicable(case, cuda, torch.bfloat16) is None
    for miss, why in other_misses:
        assert why in not_applicable(miss, cuda, torch.bfloat16)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert "exact fp32" in not_applicable(case, cuda, torch.float32)
        torch.set_float32_matmul_precision("high")
        assert not_applicable(case, cuda, torch.float32) is None
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("provider, reason", [("lora_kernels_fused", "sm_90"), ("lora_kernels_tma", "sm_90"),
                                              ("lora_kernels_triton", "CUDA"), ("lora_kernels_cublas", "CUDA")])
def test_cpu_run_reports_the_forward_variant_rows_not_applicable(tmp_path, provider, reason):
    res = bench.run(shapes=[(20, 32, 24, 4)], device="cpu", reps=1, warmup=0, out=tmp_path,
                    providers=[provider, "base"], families=["dense"], verbose=False, plot=False)["dense"]
    assert [r["impl"] for r in res["rows"]] == ["base"]
    assert reason in res["not_applicable"]["20,32,24,4"][provider]


def test_triton_route_row_applies_on_cuda_at_small_m_only():
    from lora_kernels.kernels import configs
    cuda, m = torch.device("cuda"), configs.DENSE_TORCH_MAX_M
    assert bench.triton_route_not_applicable(bench.Case(m, 64, 64, 8), cuda, torch.bfloat16) is None
    assert "above" in bench.triton_route_not_applicable(bench.Case(m + 1, 64, 64, 8), cuda, torch.bfloat16)


def test_triton_route_and_tma_rows_pin_the_triton_kernels():
    from lora_kernels.ops.lora_linear import DENSE_TORCH_MAX_M_ENV
    from lora_kernels.ops.triton_launch import TMA_MIN_M_ENV
    for around in (bench.triton_route, bench.tma_gemms):
        seen = around(lambda: (os.environ.get(DENSE_TORCH_MAX_M_ENV), os.environ.get(TMA_MIN_M_ENV)))()
        assert seen[0] == "0"
    assert bench.tma_gemms(lambda: os.environ.get(TMA_MIN_M_ENV))() == "1"
    assert DENSE_TORCH_MAX_M_ENV not in os.environ


@pytest.mark.skipif(not triton_launch.is_interpreted(), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("provider, kernel_name, env", [
    ("lora_kernels_fused", "lora_forward_fused_kernel", triton_launch.FUSED_MIN_M_ENV),
    pytest.param("lora_kernels_tma", "lora_forward_gemm_tma_kernel", triton_launch.TMA_MIN_M_ENV,
                 marks=needs_interpreter_with_tma),
    pytest.param("lora_kernels_tma", "lora_grad_input_tma_kernel", triton_launch.TMA_MIN_M_ENV,
                 marks=needs_interpreter_with_tma),
])
def test_variant_provider_switches_its_kernel_on(monkeypatch, provider, kernel_name, env):
    recorder = GridRecorder(getattr(triton_launch, kernel_name))
    launched = recorder.grids
    monkeypatch.setattr(triton_launch, kernel_name, recorder)
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "triton")
    monkeypatch.delenv(env, raising=False)
    p = bench.make_problem(20, 32, 24, 4, torch.device("cpu"), torch.float16)
    impls = bench.build_impls(p, ["lora_kernels", provider])

    dy = torch.randn(20, 24, generator=torch.Generator().manual_seed(1)).half()

    def forward_backward(name):  # y and dX, as the timers run them
        p.x.grad = None
        y = impls[name].forward()
        impls[name].backward(y, dy)
        return y, p.x.grad

    variant = forward_backward(provider)
    assert len(launched) == 1 and env not in os.environ
    default = forward_backward("lora_kernels")
    assert len(launched) == 1  # the plain provider keeps the default kernels
    for got, want in zip(variant, default):
        assert torch.allclose(got, want, rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(not triton_launch.is_interpreted(), reason="needs TRITON_INTERPRET=1")
def test_cublas_provider_switches_its_route_on(monkeypatch):
    routes = []
    for name in ("_cublas_base_forward", "_cublas_base_grad_input"):
        real = getattr(triton_launch, name)
        monkeypatch.setattr(triton_launch, name, lambda *a, real=real, name=name: (routes.append(name), real(*a))[1])
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "triton")
    monkeypatch.delenv(triton_launch.DENSE_CUBLAS_MIN_M_ENV, raising=False)
    p = bench.make_problem(20, 32, 24, 4, torch.device("cpu"), torch.float16)
    impls = bench.build_impls(p, ["lora_kernels", "lora_kernels_cublas"])
    dy = torch.randn(20, 24, generator=torch.Generator().manual_seed(1)).half()
    results = {}
    for name in ("lora_kernels_cublas", "lora_kernels"):
        p.x.grad = None
        y = impls[name].forward()
        impls[name].backward(y, dy)
        results[name] = (y, p.x.grad)
        if name == "lora_kernels_cublas":
            assert routes == ["_cublas_base_forward", "_cublas_base_grad_input"]
    assert len(routes) == 2 and triton_launch.DENSE_CUBLAS_MIN_M_ENV not in os.environ  # the default: off
    for got, want in zip(results["lora_kernels_cublas"], results["lora_kernels"]):
        assert torch.allclose(got, want, rtol=2e-3, atol=2e-3)


def test_cpu_timer_order_is_random_per_rep_and_seeded():
    """Every (provider, mode) gets its samples; the call order changes from rep to rep (a fixed order
    biases the row that always follows the same call) and is the same in every run."""
    def run():
        calls = []

        def impl(name):
            def forward():
                calls.append(name)
                return torch.ones(2, 2, requires_grad=True) * 1.0
            return bench.Impl(name, forward, [])

        impls = {n: impl(n) for n in ("a", "b", "c", "d")}
        times = bench.time_impls(impls, torch.ones(2, 2), reps=6, warmup=1, phases=("fwd",))
        assert {n: len(t["fwd"]) for n, t in times.items()} == dict.fromkeys(impls, 6)
        return [tuple(calls[i:i + 4]) for i in range(0, len(calls), 4)]

    orders = run()
    assert len(orders) == 7 and all(sorted(o) == ["a", "b", "c", "d"] for o in orders)
    assert len(set(orders)) > 1
    assert run() == orders


def test_source_hash_names_the_code_that_ran(tmp_path, monkeypatch):
    import re as _re
    from lora_kernels.tools import bench as bench_module
    first = bench_module.source_hash()
    assert _re.fullmatch(r"[0-9a-f]{12}", first) and bench_module.source_hash() == first
    assert bench_module.environment_metadata()["source_hash"] == first


def test_format_table_shows_times_only_from_a_gpu():
    meta = {"device": "dev", "dtype": "float32", "torch": "t", "triton": "tr", "peft": "p", "bitsandbytes": "b"}
    rows = [{"shape": "16,64,64,4", "impl": impl, "fwd_ms": fwd, "bwd_ms": 2 * fwd, "fwdbwd_ms": 3 * fwd,
             "fwdbwd_TFLOPs": 12.5 / fwd, "fwdbwd_GBps": 321.5, "fwd_vs_base": fwd / 0.25, "bwd_vs_base": fwd / 0.25,
             "fwdbwd_vs_base": fwd / 0.25, "fwdbwd_vs_peft": fwd / 0.375}
            for impl, fwd in (("lora_kernels", 0.3125), ("peft", 0.375), ("base", 0.25))]
    gpu = bench.format_table(rows, {**meta, "device_type": "cuda"}).splitlines()
    cpu = bench.format_table(rows, {**meta, "device_type": "cpu"}).splitlines()
    assert "fwd ms" in gpu[1] and "TF/s" in gpu[1] and "0.3125" in gpu[2] and "321.5" in gpu[2]
    assert "ratios" in cpu[0] and " ms" not in cpu[1] and "TF/s" not in cpu[1] and "GB/s" not in cpu[1]
    for row, line in zip(rows, cpu[2:]):
        assert line.split()[2:] == [f"{row['fwd_vs_base']:.3f}"] * 3 + [f"{row['fwdbwd_vs_peft']:.3f}"]
