"""The host-overhead tool (tools.overhead) and the dry run it uses without a GPU (tools.dry_run).

The dry run needs Triton's compiler, not its interpreter, so it runs in a subprocess without
TRITON_INTERPRET (which tests/conftest.py sets), as ``python -m lora_kernels overhead`` would."""
import argparse
import json
import os
import subprocess
import sys
import types
from collections import Counter

import pytest
import torch

from lora_kernels.tools import overhead
from lora_kernels.tools.dry_run import DryRunUnavailable, count_launches, dry_run
from lora_kernels.tools.models import bitsandbytes_importable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# In the subprocess: the dry run's launches of one dense and one NF4 forward + backward (M = 64 takes the
# NF4 slab route there, as on a GPU), then the overhead CLI on two providers.
_DRY_RUN_SCRIPT = r"""
import json, sys, torch
import lora_kernels
from lora_kernels.ops import triton_launch
from lora_kernels.tools.dry_run import dry_run
from lora_kernels.tools.overhead import build_layer
out = {}
providers = ["lora_kernels", "lora_kernels_fa"] + (["lora_kernels_qlora"] if sys.argv[1] == "1" else [])
bnb_slabs = []  # (n0, n1) of each slab bitsandbytes' kernel decodes
real = triton_launch.bnb_dequantize_rows
triton_launch.bnb_dequantize_rows = lambda *a: (bnb_slabs.append(a[1:3]), real(*a))[1]
with dry_run() as launches:
    for p in providers:
        model = build_layer(p, 128, 64, 8, "cpu", torch.float32)
        x = torch.randn(64, 128, requires_grad=True)
        y = model(x)
        fwd = dict(launches); launches.clear()
        fwd_slabs = list(bnb_slabs); bnb_slabs.clear()
        y.backward(torch.randn_like(y))
        out[p] = {"fwd": fwd, "bwd": dict(launches), "y_shape": list(y.shape), "dx_shape": list(x.grad.shape),
                  "fwd_bnb_slabs": fwd_slabs, "bwd_bnb_slabs": list(bnb_slabs)}
        launches.clear(); bnb_slabs.clear()
print(json.dumps(out))
"""


def _subprocess_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def test_dry_run_takes_the_gpu_route_and_counts_its_launches():
    qlora = bitsandbytes_importable()
    proc = subprocess.run([sys.executable, "-c", _DRY_RUN_SCRIPT, "1" if qlora else "0"], env=_subprocess_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    dense = got["lora_kernels"]
    # the Triton route of a CUDA call: shrink + GEMM forward; grad-out pass, dX and dA backward
    assert dense["fwd"] == {"lora_shrink_kernel": 1, "lora_forward_gemm_kernel": 1}
    assert dense["bwd"] == {"lora_grad_out_pass_kernel": 1, "lora_grad_input_kernel": 1, "lora_grad_a_kernel": 1}
    assert dense["y_shape"] == [64, 64] and dense["dx_shape"] == [64, 128]
    # LoRA-FA: no dA kernel
    assert got["lora_kernels_fa"]["bwd"] == {"lora_grad_out_pass_kernel": 1, "lora_grad_input_kernel": 1}
    if qlora:  # M = 64: the slab route (decoded slabs + cuBLAS), forward and dX
        nf4 = got["lora_kernels_qlora"]
        # as on CUDA, bitsandbytes' kernel decodes the forward's slabs (whole rows), the Triton tiles the
        # backward's (columns)
        assert "nf4_dequantize_tiles_kernel" not in nf4["fwd"] and nf4["fwd_bnb_slabs"] == [[0, 64]]
        assert nf4["fwd"] == {"lora_shrink_kernel": 1, "lora_forward_gemm_kernel": 1}
        assert nf4["bwd"].get("nf4_dequantize_tiles_kernel", 0) >= 1 and nf4["bwd_bnb_slabs"] == []
    assert all(not got[p]["fwd_bnb_slabs"] and not got[p]["bwd_bnb_slabs"] for p in ("lora_kernels", "lora_kernels_fa"))


def test_overhead_cli_writes_rows_for_each_provider_and_mode(tmp_path):
    cmd = [sys.executable, "-m", "lora_kernels", "overhead", "--providers", "peft,lora_kernels",
           "--modes", "infer,fwdbwd", "--shapes", "16x64x32", "--calls", "2", "--reps", "2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=_subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "overhead_float32.json").read_text())
    rows = {(r["provider"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(p, m) for p in ("peft", "lora_kernels") for m in ("infer", "fwdbwd")}
    for (provider, mode), row in rows.items():
        assert row["host_us"] > 0 and row["wall_us"] >= row["host_us"] * 0.999
        assert (row["M"], row["K"], row["N"]) == (16, 64, 32)
        assert row["dry_run"] == (provider == "lora_kernels")
        assert row["host_vs_peft"] == pytest.approx(row["host_us"] / rows[("peft", mode)]["host_us"])
    assert rows[("peft", "fwdbwd")]["launches"] == 0
    # M = 16 without dropout: dense calls take the lean PyTorch route on a GPU (DENSE_TORCH_MAX_M), here too
    assert rows[("lora_kernels", "infer")]["launches"] == 0
    assert result["metadata"]["device_type"] == "cpu"
    assert (tmp_path / "overhead_float32.csv").read_text().startswith(",".join(overhead.CSV_FIELDS))


def test_dry_run_refuses_the_interpreter():
    # tests/conftest.py runs the kernels under TRITON_INTERPRET=1: nothing to compile ahead of time
    if torch.cuda.is_available():
        pytest.skip("with a GPU the dry run refuses for that reason first")
    with pytest.raises(DryRunUnavailable, match="TRITON_INTERPRET"):
        with dry_run():
            pass


def test_count_launches_counts_launches_not_compiles_and_restores_triton(monkeypatch):
    from triton.runtime.jit import JITFunction

    def fake_run(self, *args, grid, warmup, **kwargs):
        return "ran"

    monkeypatch.setattr(JITFunction, "run", fake_run)
    from lora_kernels.ops import launch as launch_mod

    kernel = types.SimpleNamespace(__name__="some_kernel")
    with count_launches() as launches:
        assert launches in launch_mod.FAST_LAUNCH_COUNTERS  # ops.launch's fast launches count too
        assert JITFunction.run(kernel, 1, grid=(1,), warmup=False, BLOCK=4) == "ran"
        JITFunction.run(kernel, grid=(1,), warmup=True)  # a compile, not a launch
        JITFunction.run(kernel, grid=(2,), warmup=False)
    assert launches == Counter({"some_kernel": 2})
    assert JITFunction.run is fake_run and launch_mod.FAST_LAUNCH_COUNTERS == []


def test_ratios_and_reference_rows():
    rows = [{"provider": p, "M": 1, "K": 2, "N": 3, "mode": "fwd", "host_us": t}
            for p, t in (("peft", 10.0), ("lora_kernels", 5.0), ("peft_qlora", 40.0), ("lora_kernels_qlora_fa", 30.0))]
    overhead.add_ratios(rows)
    assert [r["host_vs_peft"] for r in rows] == [1.0, 0.5, 1.0, 0.75]
    assert overhead.reference_of("lora_kernels_qlora_fa") == "peft_qlora"
    assert overhead.family_of("lora_kernels_fa") == "dense"


@pytest.mark.parametrize("argv, message", [
    (["--providers", "peft,nope"], "providers"),
    (["--modes", "bwd"], "modes"),
    (["--calls", "0"], "calls"),
    (["--shapes", "0x4x4"], "shapes"),
    (["--shapes", "4x4"], "shapes"),
])
def test_bad_options_raise_naming_them(argv, message):
    parser = argparse.ArgumentParser()
    overhead.add_arguments(parser)
    with pytest.raises(ValueError, match=message):
        overhead.run_from_args(parser.parse_args(argv + ["--out", "unused"]))


def test_shape_option_rejects_text():
    with pytest.raises(argparse.ArgumentTypeError, match="MxKxN"):
        overhead._shape_list("4xa")
    assert overhead._shape_list("4x8x16,1x2x3") == [(4, 8, 16), (1, 2, 3)]


def test_build_layer_rejects_unknown_provider():
    with pytest.raises(ValueError, match="provider must be one of"):
        overhead.build_layer("nope", 8, 8, 2, "cpu", torch.float32)


def test_cpu_rows_are_timed_on_one_thread():
    before = torch.get_num_threads()
    with overhead._one_cpu_thread(torch.device("cpu")):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with overhead._one_cpu_thread(torch.device("meta")):  # only a CPU's computing rows are pinned
        assert torch.get_num_threads() == before


def test_table_shows_host_times_only_from_a_gpu():
    rows = [{"provider": p, "M": 4, "K": 64, "N": 32, "mode": "fwd", "host_us": us, "wall_us": us + 1.25,
             "launches": n, "host_vs_peft": us / 123.4} for p, us, n in (("peft", 123.4, 0), ("lora_kernels", 234.5, 2))]
    gpu = overhead.format_table(rows).splitlines()
    cpu = overhead.format_table(rows, absolute=False).splitlines()
    assert "host us" in gpu[0] and "234.5" in gpu[2] and "235.8" in gpu[2]
    assert "us" not in cpu[0].replace("host vs", "") and "234.5" not in cpu[2] and "235.8" not in cpu[2]
    assert cpu[2].split()[-2:] == ["2", f"{234.5 / 123.4:.2f}x"] and "ratio" in cpu[-1]
