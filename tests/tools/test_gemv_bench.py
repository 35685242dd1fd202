"""The CUDA NF4 GEMV benchmark's structure, run on CPU with the op's PyTorch spec (CPU times say
nothing about the kernel): files, rows consistent with their own times, goals, bad arguments."""
import json

import pytest
import torch

from lora_kernels.tools import gemv_bench

pytest.importorskip("bitsandbytes")


def test_cpu_run_writes_consistent_rows(tmp_path, capsys):
    res = gemv_bench.run(device="cpu", dtype="fp32", kns=[(128, 96)], ms=(1, 3), r=4, out=tmp_path, reps=2,
                         warmup=0)
    data = json.loads((tmp_path / "gemv_float32.json").read_text())
    assert (tmp_path / "gemv_float32.csv").exists() and data["metadata"]["torch"] and data["ceilings"]["copy_GBps"] > 0
    assert [(r["K"], r["N"], r["M"], r["kernel"]) for r in data["rows"]] == [
        (128, 96, 1, "simt"), (128, 96, 1, "mma"), (128, 96, 3, "simt"), (128, 96, 3, "mma")]
    for r in res["rows"]:
        assert r["rel_err"] < 1e-5  # the op (CPU spec) against the float64 reference
        assert all(r[f"{p}_ms"] > 0 for p in gemv_bench.PROVIDERS)
        assert r["speedup_vs_bnb"] == pytest.approx(r["bnb_ms"] / r["gemv_lora_ms"])
        assert r["speedup_vs_dense"] == pytest.approx(r["dense_ms"] / r["gemv_lora_ms"])
        assert r["lora_overhead"] == pytest.approx(r["gemv_lora_ms"] / r["gemv_base_ms"] - 1)
        q_bytes = r["gemv_GBps"] * r["gemv_lora_ms"] * 1e6
        assert r["copy_fraction"] == pytest.approx(r["gemv_GBps"] / res["ceilings"]["copy_GBps"])
        assert q_bytes == pytest.approx(128 * 96 / 2 + 128 * 96 / 64 + 256 * 4 + 4 * 1 + 4 + 16 * 4, rel=0.05)
    checks = res["goals"]["checks"]
    assert {c["goal"] for c in checks} == {"copy bandwidth", "vs bitsandbytes", "vs dense", "LoRA overhead"}
    assert sorted({c["shape"] for c in checks}) == ["128x96 mma", "128x96 simt"]  # M = 1 only, per kernel
    one, other = (r for r in res["rows"] if r["M"] == 1)
    assert one["bnb_ms"] == other["bnb_ms"] and one["dense_ms"] == other["dense_ms"]  # timed once per problem
    out = capsys.readouterr().out
    assert "GPU goals" in out
    # no absolute CPU times printed: neither per case nor in the table
    assert " ms" not in out and "gemv+lora" not in out
    assert not any(f"{r['gemv_lora_ms']:.4f}" in out for r in res["rows"])


def test_table_and_goal_counts():
    rows = [{"K": 64, "N": 32, "M": 1, "kernel": "simt", "gemv_lora_ms": 0.1234, "gemv_base_ms": 0.1, "bnb_ms": None,
             "dense_ms": 0.2, "gemv_GBps": 12.5, "copy_fraction": 0.5, "speedup_vs_bnb": None, "speedup_vs_dense": 1.6,
             "lora_overhead": 0.234}]
    goals = gemv_bench.check_goals(rows, "cuda")
    gpu = gemv_bench.format_table(rows, goals)
    assert "0.1234" in gpu and gpu.splitlines()[-1] == "goals at M=1: 0 of 4 met, 1 not measured"  # no bnb: not measured
    cpu = gemv_bench.format_table(rows, goals, absolute=False)
    assert "0.1234" not in cpu and "12.5" not in cpu and "1.60" in cpu


def test_rank_zero_is_the_plain_decode(tmp_path):
    """gemv_base (rank 0) computes x W^T: the LoRA term's cost is measured against the same op."""
    from lora_kernels import NF4Weight
    q = NF4Weight.quantize(torch.randn(40, 64))
    x, A, B = torch.randn(2, 64), torch.randn(4, 64), torch.randn(40, 4)
    impls = gemv_bench._providers(x, q, q.dequantize(), A, B, 0.5)
    y0, y = impls["gemv_base"].infer(), impls["gemv_lora"].infer()
    W = q.dequantize().double()
    assert torch.allclose(y0.double(), x.double() @ W.t(), rtol=1e-5, atol=1e-5)
    assert torch.allclose((y - y0).double(), 0.5 * (x.double() @ A.double().t()) @ B.double().t(), rtol=1e-4,
                          atol=1e-4)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="r must"):
        gemv_bench.run(device="cpu", r=65, out=tmp_path)
    with pytest.raises(ValueError, match="ms must"):
        gemv_bench.run(device="cpu", ms=(17,), out=tmp_path)
    with pytest.raises(ValueError, match="ms must"):
        gemv_bench.run(device="cpu", ms=(), out=tmp_path)
    with pytest.raises(ValueError, match="kernels must"):
        gemv_bench.run(device="cpu", kernels=("wgmma",), out=tmp_path)


def test_kernels_the_device_does_not_allow_are_left_out(monkeypatch):
    """On CUDA a kernel whose eligibility rule refuses the call gets no row (it would time the other)."""
    from lora_kernels import NF4Weight
    from lora_kernels.ops import nf4_gemv
    q = NF4Weight.quantize(torch.randn(32, 320))
    monkeypatch.setattr(nf4_gemv, "mma_eligible", lambda x2, wq: wq.K % 256 == 0)
    x = torch.randn(2, 320)
    assert gemv_bench._runnable(("simt", "mma"), x, q, torch.device("cuda")) == ["simt"]
    q256 = NF4Weight.quantize(torch.randn(32, 256))
    assert gemv_bench._runnable(("simt", "mma"), torch.randn(2, 256), q256, torch.device("cuda")) == ["simt", "mma"]
    assert gemv_bench._runnable(("mma",), x, q, torch.device("cpu")) == ["mma"]  # CPU: the spec runs both


def test_cli(tmp_path):
    from lora_kernels.__main__ import main
    main(["gemv", "--device", "cpu", "--shapes", "64,32", "--m", "1", "--r", "2", "--reps", "1",
          "--kernels", "mma", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "gemv_float32.json").read_text())["rows"]
    assert [(r["N"], r["kernel"]) for r in rows] == [(32, "mma")]
