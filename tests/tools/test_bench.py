"""Fast checks of the timing tool on tiny shapes (under the Triton interpreter when no GPU)."""
import csv
import json

import pytest

from lora_kernels.tools import bench

SHAPE = (33, 40, 24, 4)  # odd M, non-power-of-two K/N: tiny but not tile-aligned


def test_parse_shapes():
    assert bench.parse_shapes("1,2,3,4; 5,6,7,8;") == [(1, 2, 3, 4), (5, 6, 7, 8)]
    with pytest.raises(ValueError):
        bench.parse_shapes("1,2,3")


def test_bench_writes_sane_results(tmp_path):
    res = bench.run(shapes=[SHAPE], device="cpu", dtype="fp32", reps=2, warmup=1, out=tmp_path,
                    verbose=False)
    stem = tmp_path / "bench_float32"
    for ext in ("json", "csv", "png"):
        assert stem.with_suffix(f".{ext}").stat().st_size > 0

    data = json.loads(stem.with_suffix(".json").read_text())
    meta = data["metadata"]
    for key in ("device", "torch", "triton", "bitsandbytes", "peft", "git_commit", "utc_date", "dtype"):
        assert key in meta
    assert meta["dtype"] == "float32" and meta["device"].endswith("(cpu)")

    rows = {r["impl"]: r for r in data["rows"]}
    skipped = data["skipped"].get(",".join(map(str, SHAPE)), {})
    # Every requested implementation is either measured or reported as failed, never lost.
    assert set(rows) | set(skipped) == set(data["config"]["impls"])
    assert {"lora_kernels", "torch_unfused", "base"} <= set(rows)
    for r in rows.values():
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["fwdbwd_ms"] > 0
        assert r["ratio_vs_base"] > 0
        if r["impl"] != "base":
            assert r["out_max_abs_diff"] < 1e-4  # all rows compute the same layer
    assert rows["base"]["ratio_vs_base"] == pytest.approx(1.0)
    if "peft" in rows:
        assert rows["peft"]["ratio_vs_peft"] == pytest.approx(1.0)
        assert rows["lora_kernels"]["ratio_vs_peft"] > 0

    with open(stem.with_suffix(".csv")) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == bench.BENCH_CSV_FIELDS
    assert len(table) == len(res["rows"])


def test_cli_subset(tmp_path):
    from lora_kernels.__main__ import main

    main(["bench", "--device", "cpu", "--shapes", "17,16,8,2", "--reps", "1", "--warmup", "0",
          "--impls", "lora_kernels,base", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench_float32.json").read_text())["rows"]
    assert [r["impl"] for r in rows] == ["lora_kernels", "base"]
    assert rows[0]["ratio_vs_peft"] is None  # no PEFT row asked for
