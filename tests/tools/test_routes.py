"""``python -m lora_kernels routes``: opt-in routes beside their defaults, from synthetic result files
of each benchmark kind (layer, GEMV, training), nested as a device run writes them."""
import json

import pytest

import lora_kernels.__main__ as cli
from lora_kernels.tools import routes


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metadata": {}, "rows": rows}))


def _layer(impl, M, fwd, bwd=None, K=4096, N=4096):
    return {"impl": impl, "M": M, "K": K, "N": N, "r": 16, "fwd_ms": fwd, "bwd_ms": bwd, "fwdbwd_ms": None,
            "infer_ms": None}


@pytest.fixture
def results(tmp_path):
    _write(tmp_path / "bench_qlora_bfloat16.json", [
        _layer("lora_kernels_nf4_cublas", 64, 2.0, 4.0), _layer("lora_kernels_nf4_cublas_cuda", 64, 1.0, 3.0),
        _layer("lora_kernels_nf4_cublas", 4096, 5.0), _layer("lora_kernels_nf4_cublas_cuda", 4096, 6.0),
        _layer("lora_kernels_nf4_cublas_cuda", 8192, 1.0),  # no baseline row for this case: not compared
        _layer("lora_kernels_nf4_cublas_triton", 4096, 7.0),
        _layer("lora_kernels_nf4", 16, 1.0, 8.0), _layer("lora_kernels_nf4_cuda_dx", 16, 1.0, 2.0),
        _layer("lora_kernels_nf4", 128, 1.0, 8.0), _layer("lora_kernels_nf4_cuda_dx", 128, 1.0, 2.0),  # M > 64
    ])
    # the same cases in another folder of the run: compared within their folder only
    _write(tmp_path / "qlora_small_m" / "bench_qlora_bfloat16.json", [
        _layer("lora_kernels_nf4_gemv", 32, 0.5), _layer("lora_kernels_nf4_cublas", 32, 1.0),
        _layer("lora_kernels_nf4_gemv", 8, 0.1), _layer("lora_kernels_nf4_cublas", 8, 1.0),  # M <= 16: not this route
    ])
    _write(tmp_path / "gemv_bfloat16.json", [
        {"K": 8192, "N": 28672, "M": 1, "r": 16, "kernel": k, "gemv_lora_ms": ms}
        for k, ms in (("simt", 0.13), ("mma", 0.04))])
    _write(tmp_path / "train_routes" / "train_bfloat16.json", [
        {"variant": v, "shape": "1b 4x1024", "median_step_ms": ms}
        for v, ms in (("lora_kernels_qlora", 180.0), ("lora_kernels_qlora_cuda_decode", 120.0),
                      ("lora_kernels_qlora_triton_decode", 200.0))])
    (tmp_path / "notes.json").write_text("[1, 2]")  # not a benchmark file: ignored
    return tmp_path


def _route(title_start):
    return next(r for r in routes.ROUTES if r.title.startswith(title_start))


def test_routes_compare_shared_cases(results):
    rows = routes.load_rows(results)
    slab = routes.compare(_route("CUDA slab decoder"), rows["layer"])
    assert sorted((c[0][1], c[1], c[4]) for c in slab) == [(64, "bwd_ms", 0.75), (64, "fwd_ms", 0.5),
                                                           (4096, "fwd_ms", 1.2)]
    dx = routes.compare(_route("CUDA dX kernel"), rows["layer"])
    assert [(c[0][1], c[1], c[4]) for c in dx] == [(16, "bwd_ms", 0.25)]  # M = 16 only: M <= 64
    gemv_vs_slab = routes.compare(_route("CUDA GEMV (launches"), rows["layer"])
    assert [(c[0][0], c[0][1], c[4]) for c in gemv_vs_slab] == [("qlora_small_m", 32, 0.5)]
    mma = routes.compare(_route("tensor-core GEMV vs SIMT GEMV (decode"), rows["gemv"])
    assert [round(c[4], 4) for c in mma] == [round(0.04 / 0.13, 4)]
    train = routes.compare(_route("training steps: CUDA slab"), rows["train"])
    assert [c[4] for c in train] == [120.0 / 180.0]
    tiles = routes.compare(_route("Triton tiles for every slab"), rows["layer"])
    assert [(c[0][1], c[1], c[4]) for c in tiles] == [(4096, "fwd_ms", 1.4)]
    train = routes.compare(_route("training steps: Triton slab"), rows["train"])
    assert [c[4] for c in train] == [200.0 / 180.0]


def test_report_gives_a_verdict_per_route(results):
    text = routes.report(results)
    assert text.count("\n  ") >= len(routes.ROUTES)  # a line under every route
    slab = text.split("CUDA slab decoder vs the default")[1].split("\n")
    assert "faster in 2 of 3 cases, median ratio 0.750" in slab[1]
    assert "slower at 4096 4096 4096 16 fwd_ms: 6 vs 5 ms (1.200)" in slab[2]
    assert "no case with both rows" in text.split("dense cuBLAS base route vs")[1].split("\n")[1]


def test_cli(results, capsys):
    cli.main(["routes", "--results", str(results)])
    assert "training steps: CUDA slab decoder" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["routes", "--results", str(results / "missing")])
