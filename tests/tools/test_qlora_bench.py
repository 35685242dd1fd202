"""Fast checks of the QLoRA benchmark on tiny shapes (CPU: lora_kernels' torch path, bitsandbytes'
CPU backend, PEFT's lora.bnb.Linear4bit)."""
import json
import os

import pytest

from lora_kernels.ops.triton_launch import is_interpreted
from lora_kernels.tools import qlora_bench

M, K, N, R = 5, 128, 40, 4  # K a multiple of 64 (see qlora_bench.CPU_KN)
F32 = 4


def test_default_shapes_are_the_issue_grid():
    import torch

    cuda = qlora_bench.default_shapes(torch.device("cuda"))
    assert sorted({s[0] for s in cuda}) == [1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096, 8192]
    assert {(s[1], s[2]) for s in cuda} == {(4096, 4096), (4096, 14336), (8192, 28672)}
    assert {s[3] for s in cuda} == {16} and len(cuda) == 33
    assert all(s[1] % 64 == 0 for s in qlora_bench.default_shapes(torch.device("cpu")))


def test_qlora_bench_writes_sane_results(tmp_path):
    res = qlora_bench.run(shapes=[(M, K, N, R)], device="cpu", dtype="fp32", reps=2, warmup=1,
                          out=tmp_path, verbose=False)
    stem = tmp_path / "bench_qlora_float32"
    for ext in ("json", "csv", "png"):
        assert stem.with_suffix(f".{ext}").stat().st_size > 0
    data = json.loads(stem.with_suffix(".json").read_text())
    # what run returns is what it wrote (JSON turns tuples into lists)
    assert json.loads(json.dumps(res, default=str)) == data
    for key in ("device", "torch", "triton", "bitsandbytes", "peft", "git_commit", "utc_date"):
        assert key in data["metadata"]
    fmt = data["formats"][f"{K},{N}"]
    assert fmt["dense_bytes"] == N * K * F32 and fmt["nf4_bytes"] < fmt["dense_bytes"] / 3

    rows = {r["impl"]: r for r in data["rows"]}
    skipped = data["skipped"].get(f"{M},{K},{N},{R}", {})
    # every row but the CUDA GEMV one (GPU + built extension only) runs on CPU, or is reported not
    # applicable with its reason (the one-launch forward: sm_90 GPUs only)
    not_applicable = data["not_applicable"].get(f"{M},{K},{N},{R}", {})
    assert set(rows) | set(skipped) | set(not_applicable) == set(data["config"]["impls"])
    assert set(not_applicable) == {"lora_kernels_nf4_fused"}
    assert set(data["config"]["impls"]) == set(qlora_bench.QLORA_IMPLS) - set(qlora_bench.EXTENSION_IMPLS)
    assert not skipped, skipped  # bitsandbytes and peft are test dependencies: every row runs
    for r in rows.values():
        assert all(r[f"{ph}_ms"] > 0 for ph in qlora_bench.PHASES)
        assert r["out_rel_err"] < 1e-5, r["impl"]  # every row computes what it claims
        assert r["peak_fwdbwd_bytes"] is None  # CPU: no allocator statistics
        # weight bytes read per inference forward over its time: NF4 bytes, or the dense weight's
        weight = fmt["dense_bytes"] if r["impl"] == "base_dense" else fmt["nf4_bytes"]
        assert r["infer_GBps"] == pytest.approx(weight / (r["infer_ms"] * 1e6))
        assert r["infer_vs_base"] == pytest.approx(r["infer_ms"] / rows["base_dense"]["infer_ms"])
        # like for like: the A-frozen rows against PEFT with A frozen
        ref = "peft_qlora_fa" if r["impl"] in ("lora_kernels_nf4_fa", "peft_qlora_fa") else "peft_qlora"
        assert r["peft_ref"] == ref
        assert r["fwdbwd_vs_peft"] == pytest.approx(r["fwdbwd_ms"] / rows[ref]["fwdbwd_ms"])
    assert data["config"]["modes"] == list(qlora_bench.PHASES)
    assert rows["peft_qlora"]["fwd_vs_peft"] == pytest.approx(1.0)
    assert rows["base_dense"]["fwd_vs_base"] == pytest.approx(1.0)
    assert rows["lora_kernels_nf4"]["fwdbwd_vs_peft"] > 0
    # Saved activations: LoRA-FA keeps h [M, r] only; full LoRA adds x; the NF4 weight never counts.
    assert rows["lora_kernels_nf4_fa"]["saved_bytes"] == M * R * F32
    assert rows["lora_kernels_nf4"]["saved_bytes"] == M * K * F32 + M * R * F32
    assert rows["peft_qlora"]["saved_bytes"] >= M * K * F32
    assert rows["peft_qlora_fa"]["saved_bytes"] < rows["peft_qlora"]["saved_bytes"]  # no dA: x not kept for it
    assert rows["base_dense"]["saved_bytes"] == 0
    assert len(data["goals"]["checks"]) == 2  # M = 5: fwd and fwd+bwd vs PEFT


def test_check_goals_flags_misses():
    def row(M, fwd_peft, fb_peft, fwd_dense):
        return {"impl": "lora_kernels_nf4", "shape": f"{M},4096,4096,16", "M": M, "fwd_vs_peft": fwd_peft,
                "fwdbwd_vs_peft": fb_peft, "fwd_vs_base": fwd_dense}
    checks = qlora_bench.check_goals([row(8, 0.5, 0.6, 3.0), row(4096, 0.9, 0.7, 1.04),
                                      {"impl": "peft_qlora", "M": 8}])
    got = {(c["goal"], c["shape"].split(",")[0]): c["met"] for c in checks}
    assert got == {("fwdbwd_vs_peft", "8"): True, ("fwd_vs_peft", "8"): True,
                   ("fwdbwd_vs_peft", "4096"): False, ("nf4_gemm_vs_dense_fwd", "4096"): True}
    # a mode that was not measured gives no check (not a miss)
    only_fwd = {"impl": "lora_kernels_nf4", "shape": "8,64,64,4", "M": 8, "fwd_vs_peft": 0.5, "fwd_vs_base": 2.0}
    assert [c["goal"] for c in qlora_bench.check_goals([only_fwd])] == ["fwd_vs_peft"]


def test_cli_qlora_subset(tmp_path):
    from lora_kernels.__main__ import main

    main(["qlora", "--device", "cpu", "--shapes", "3,64,16,2", "--reps", "1", "--warmup", "0",
          "--impls", "lora_kernels_nf4,base_dense", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench_qlora_float32.json").read_text())["rows"]
    assert [r["impl"] for r in rows] == ["lora_kernels_nf4", "base_dense"]
    assert rows[0]["fwd_vs_peft"] is None  # no PEFT row asked for


def test_suggest_threshold():
    def rows(ratios):
        return [{"weight": "nf4", "M": M, "split_vs_no_split": v} for M, v in ratios]
    assert qlora_bench.suggest_threshold(rows([(1, 0.5), (8, 0.9), (16, 1.2), (32, 0.8)]), "nf4") == 8
    assert qlora_bench.suggest_threshold(rows([(1, 1.1), (8, 0.9)]), "nf4") == 0
    # every (K, N) must agree at an M
    assert qlora_bench.suggest_threshold(rows([(1, 0.5), (1, 1.01), (8, 0.5)]), "nf4") == 0
    assert qlora_bench.suggest_threshold(rows([(1, 0.5)]), "dense") == 0


@pytest.mark.skipif(not is_interpreted(), reason="needs TRITON_INTERPRET=1")
def test_split_k_sweep_under_interpreter(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "triton")
    res = qlora_bench.split_k_sweep(device="cpu", dtype="fp32", ms=(1, 17), kns=((128, 40),), r=4, reps=1,
                                    warmup=0, out=tmp_path, verbose=False)
    for ext in ("json", "csv", "png"):
        assert (tmp_path / f"split_k_float32.{ext}").stat().st_size > 0
    assert {(r["weight"], r["M"]) for r in res["rows"]} == {(w, m) for w in ("nf4", "dense") for m in (1, 17)}
    assert all(r["split_ms"] > 0 and r["no_split_ms"] > 0 for r in res["rows"])
    assert set(res["suggested_small_m_max"].values()) <= {0, 1, 17}


def test_split_k_calls_switch_only_split_k():
    """Each sweep call runs with the routes that decide before split-K off, so that "split" and
    "no_split" time different code at every M: on a GPU, dense M <= 16 took the PyTorch route, NF4
    M >= 64 the cuBLAS slabs and NF4 M <= 32 the CUDA GEMV, in both modes."""
    import torch

    from lora_kernels.kernels import configs
    from lora_kernels.ops import select_backend
    from lora_kernels.ops.nf4_gemv import cuda_gemv_max_m
    from lora_kernels.ops.checks import env_nonnegative_int
    from lora_kernels.ops.triton_launch import NF4_CUBLAS_MIN_M_ENV, SMALL_M_ENV

    def routes():
        cuda = torch.device("cuda")  # the dispatch rule only: nothing runs
        return (select_backend(cuda, 1, 64, 64, 8, small_m_torch=True), cuda_gemv_max_m(),
                env_nonnegative_int(NF4_CUBLAS_MIN_M_ENV, configs.NF4_CUBLAS_MIN_M),
                env_nonnegative_int(SMALL_M_ENV, configs.SMALL_M_MAX))

    assert routes()[0] == "torch"  # the default this test is about
    assert qlora_bench.split_k_call(routes, True)() == ("triton", 0, 0, 1 << 30)
    assert qlora_bench.split_k_call(routes, False)() == ("triton", 0, 0, 0)


def test_split_k_sweep_refuses_the_torch_path(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "torch")
    with pytest.raises(ValueError, match="Triton path"):
        qlora_bench.split_k_sweep(device="cpu", dtype="fp32", ms=(1,), kns=((64, 16),), r=2, reps=1,
                                  out=tmp_path, verbose=False)


def test_qlora_cli_shares_the_bench_sweep_options():
    import argparse

    import torch

    from lora_kernels.tools import bench

    parser = argparse.ArgumentParser()
    qlora_bench.add_arguments(parser)
    args = parser.parse_args(["--model", "8b", "--proj", "down", "--m", "1,8", "--providers", "lora_kernels_nf4",
                              "--quick"])
    kw = bench.sweep_kwargs(args)
    assert kw["modes"] == list(qlora_bench.PHASES) and kw["providers"] == ["lora_kernels_nf4"] and kw["quick"]
    cases = bench.resolve_cases(torch.device("cpu"), qlora_bench.qlora_grid, kw["shapes"], kw["models"],
                                kw["projs"], kw["ms"], kw["ranks"], kw["quick"])
    assert [(c.M, c.K, c.N, c.r) for c in cases] == [(1, 14336, 4096, 16), (8, 14336, 4096, 16)]
    with pytest.raises(ValueError, match="providers"):
        qlora_bench.run(shapes=[(M, K, N, R)], device="cpu", providers=["lora_kernels"], verbose=False)


def test_gemv_provider_applicability(monkeypatch):
    from types import SimpleNamespace as NS

    import torch

    from lora_kernels.ops import nf4_gemv
    from lora_kernels.tools.bench import Case

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    na = qlora_bench._not_applicable
    hopper = NS(major=9, shared_memory_per_block_optin=232448)  # stand-in device properties (no GPU here)
    monkeypatch.setattr(nf4_gemv, "_device_properties", lambda device: hopper)
    assert na(Case(8, 4096, 4096, 16), "lora_kernels_nf4_gemv", cuda, torch.bfloat16) is None
    assert na(Case(16, 4096, 4096, 64), "lora_kernels_nf4_gemv", cuda, torch.float16) is None
    assert na(Case(64, 4096, 4096, 16), "lora_kernels_nf4_gemv", cuda, torch.bfloat16) is None  # 4 launches
    assert "M > 64" in na(Case(65, 4096, 4096, 16), "lora_kernels_nf4_gemv", cuda, torch.bfloat16)
    assert na(Case(64, 4096, 4096, 16), "lora_kernels_nf4_gemv_mma", cuda, torch.bfloat16) is None
    assert "K % 256" in na(Case(8, 4000, 4096, 16), "lora_kernels_nf4_gemv_mma", cuda, torch.bfloat16)
    assert na(Case(8, 4000, 4096, 16), "lora_kernels_nf4_gemv", cuda, torch.bfloat16) is None  # SIMT: any K
    monkeypatch.setattr(nf4_gemv, "_device_properties", lambda device: NS(major=8, shared_memory_per_block_optin=101376))
    assert "shared memory" in na(Case(8, 4096, 4096, 16), "lora_kernels_nf4_gemv_mma", cuda, torch.bfloat16)
    assert na(Case(8, 4096, 4096, 128), "lora_kernels_nf4_gemv", cuda, torch.bfloat16)
    assert na(Case(8, 4096, 4096, 16), "lora_kernels_nf4_gemv", cuda, torch.float32)
    assert na(Case(8, 4096, 4096, 16), "lora_kernels_nf4_gemv", cpu, torch.bfloat16) == "CUDA only"
    assert na(Case(4096, 4096, 4096, 16), "lora_kernels_nf4", cuda, torch.bfloat16) is None
    # the CUDA dX row: M <= 64 and K % 8 == 0 (else it repeats lora_kernels_nf4), any rank and dtype
    assert na(Case(64, 4096, 4096, 128), "lora_kernels_nf4_cuda_dx", cuda, torch.float32) is None
    assert "M <= 64" in na(Case(65, 4096, 4096, 16), "lora_kernels_nf4_cuda_dx", cuda, torch.bfloat16)
    assert "K % 8" in na(Case(8, 4004, 4096, 16), "lora_kernels_nf4_cuda_dx", cuda, torch.bfloat16)
    assert na(Case(8, 4096, 4096, 16), "lora_kernels_nf4_cuda_dx", cpu, torch.bfloat16) == "CUDA only"


def test_path_providers_pin_their_path(monkeypatch):
    # each forced-path row must time that path at every M: the CUDA GEMV (M <= 16 by default) off
    from lora_kernels.ops.nf4_gemv import NF4_GEMV_ENV, cuda_gemv_max_m
    from lora_kernels.ops.nf4_gemv import GEMV_CHUNKED_MAX_M, requested_gemv_kernel
    from lora_kernels.ops.triton_launch import FUSED_MIN_M_ENV, NF4_CUBLAS_MIN_M_ENV
    for variable in (NF4_GEMV_ENV, NF4_CUBLAS_MIN_M_ENV, FUSED_MIN_M_ENV, "LORA_KERNELS_NF4_GEMV_KERNEL"):
        monkeypatch.delenv(variable, raising=False)
    for kernel in ("simt", "mma"):  # the GEMV rows: on for every M it takes, with their kernel
        assert qlora_bench._with_gemv(kernel, lambda: (cuda_gemv_max_m(), requested_gemv_kernel()))() == (
            GEMV_CHUNKED_MAX_M, kernel)
    seen = {}
    for name, cublas in (("lora_kernels_nf4_cublas", "1"), ("lora_kernels_nf4_cublas_cuda", "1"),
                         ("lora_kernels_nf4_cublas_triton", "1"), ("lora_kernels_nf4_triton", "0"),
                         ("lora_kernels_nf4_fused", "0")):
        seen[name] = qlora_bench._with_path(name, lambda: (os.environ.get(NF4_CUBLAS_MIN_M_ENV), cuda_gemv_max_m(),
                                                           os.environ.get(FUSED_MIN_M_ENV)))()
        assert seen[name][:2] == (cublas, 0), name
    assert seen["lora_kernels_nf4_fused"][2] == "1" and seen["lora_kernels_nf4_triton"][2] is None
    from lora_kernels.ops.nf4_gemv import NF4_SLAB_DECODER_ENV
    monkeypatch.delenv(NF4_SLAB_DECODER_ENV, raising=False)
    decoder = {name: qlora_bench._with_path(name, lambda: os.environ.get(NF4_SLAB_DECODER_ENV))()
               for name in ("lora_kernels_nf4_cublas", "lora_kernels_nf4_cublas_cuda", "lora_kernels_nf4_cublas_triton")}
    assert decoder == {"lora_kernels_nf4_cublas": None, "lora_kernels_nf4_cublas_cuda": "cuda",
                       "lora_kernels_nf4_cublas_triton": "triton"}
    from lora_kernels.ops.nf4_gemv import NF4_GRAD_INPUT_ENV, cuda_grad_input_max_m
    monkeypatch.delenv(NF4_GRAD_INPUT_ENV, raising=False)
    assert qlora_bench._with_path("lora_kernels_nf4_cuda_dx", cuda_grad_input_max_m)() == 64  # the dX kernel on
    assert cuda_grad_input_max_m() == 0  # restored: off by default
    assert os.environ.get(NF4_CUBLAS_MIN_M_ENV) is None  # restored
