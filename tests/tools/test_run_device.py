"""benchmarks/run_device.sh, the script of a lent GPU machine, checked without one: every step it
documents has a branch, every ``python -m lora_kernels`` command line it runs parses with the real
CLI (a typo in an option would otherwise cost a device session), and the pytest selections pick the
GPU tests."""
import re
import shlex
from pathlib import Path

import pytest

import lora_kernels.__main__ as cli
from lora_kernels.tools import bench, gemv_bench, memory, overhead, qlora_bench, train_bench

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "run_device.sh"


def _branches() -> dict:
    """{step label: its commands (continuation lines joined)} from the script's ``case`` block."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    block = text[text.index("case $step in"):text.index("esac")]
    branches = {}
    for labels, body in re.findall(r"^\s*([\w|*-]+)\)(.*?);;", block, flags=re.S | re.M):
        for label in labels.split("|"):
            branches[label] = body.replace('"$step"', label)
    return branches


def _lora_kernels_commands(body: str) -> list:
    """argv of every ``python -m lora_kernels <command> ...`` in ``body`` (redirections dropped)."""
    found = []
    for m in re.finditer(r"python -m lora_kernels (.*?)(?:2>&1|[|;>]|$)", body, flags=re.M):
        found.append(shlex.split(m.group(1).replace('"$OUT"', "OUT")))
    return found


def test_every_documented_and_default_step_has_a_branch():
    text = SCRIPT.read_text()
    branches = _branches()
    documented = re.search(r"#\s+steps: ([\w -]+)\n", text).group(1).split()
    default = re.search(r"STEPS=\$\{\*:-([\w -]+)\}", text).group(1).split()
    assert set(default) <= set(documented) == set(branches) - {"*"}
    # the alias "first" expands (documented and in the code alike) to steps that exist
    documented_first = re.search(r"#\s+aliases: first = ([\w -]+?) \(", text).group(1).split()
    expanded_first = re.search(r"STEPS=\$\{STEPS//first/([\w -]+)\}", text).group(1).split()
    assert documented_first == expanded_first and set(expanded_first) <= set(documented)
    assert expanded_first[0] == "build"  # the benchmarks then use the CUDA GEMV
    documented_decide = re.search(r"#\s+decide = ([\w -]+?) \(", text).group(1).split()
    expanded_decide = re.search(r"STEPS=\$\{STEPS//decide/([\w -]+)\}", text).group(1).split()
    assert documented_decide == expanded_decide and set(expanded_decide) <= set(documented)
    assert expanded_decide[0] == "build"


def test_every_step_runs_under_the_deadline_cap():
    # a fixed limit would let one step run past the device call's 600 s; cap N takes what is left
    for step, body in _branches().items():
        assert not re.search(r"(?<![-\w])timeout \d", body), step
        assert not re.search(r"\$PYTEST_TIMEOUT \d", body), step


def test_lora_kernels_command_lines_parse(monkeypatch):
    seen = []
    for module in (bench, train_bench, memory, qlora_bench, gemv_bench, overhead):  # record the parsed options, run nothing
        monkeypatch.setattr(module, "run_from_args", lambda args, m=module.__name__: seen.append((m, args)))
    monkeypatch.setattr(qlora_bench, "split_k_sweep", lambda **kw: seen.append(("split_k_sweep", kw)))
    commands = {step: _lora_kernels_commands(body) for step, body in _branches().items()}
    for step in ("memory", "bench", "bench-quick", "train", "train-routes", "variants", "qlora", "qlora-quick",
                 "qlora-small-m", "gemv", "split-k", "dora", "overhead"):
        assert commands[step], f"step {step} runs no python -m lora_kernels command"
    for step, argvs in commands.items():
        for argv in argvs:
            seen.clear()
            cli.main(argv)  # argparse exits (SystemExit) on an unknown option or a bad value
            assert len(seen) == 1, (step, argv)
    # the options reach the tools as meant
    variants = _lora_kernels_commands(_branches()["variants"])[0]
    cli.main(variants)
    args = seen[-1][1]
    assert args.impls == ["lora_kernels", *bench.VARIANT_PROVIDERS, "base"] and args.m == [4096, 8192]
    assert args.family == ["dense"] and args.model == "8b"
    # the routes' training step names every opt-in row beside its default and PEFT
    cli.main(_lora_kernels_commands(_branches()["train-routes"])[0])
    args = seen[-1][1]
    assert set(train_bench.OPT_IN_VARIANTS) <= set(args.variants) and {"peft", "lora_kernels", "peft_qlora",
                                                                      "lora_kernels_qlora"} <= set(args.variants)
    # the quick bench keeps the fused-LoRA goal rows: M = 8192 on the three goal shapes
    cli.main(_lora_kernels_commands(_branches()["bench-quick"])[0])
    args = seen[-1][1]
    kns = {bench.projection_kn(args.model, p) for p in args.proj}
    assert args.quick and 8192 in args.m and kns == set(bench.DENSE_GOALS["cuda"]["kn"])


@pytest.mark.parametrize("step", ["tests", "tests-property"])
def test_gpu_test_selections_are_disjoint_and_name_the_cuda_tests(step):
    body = _branches()[step]
    expression = re.search(r'-k "([^"]+)"', body).group(1)
    assert "cuda" in expression
    assert "matches_float64_reference" in expression  # property tests: in exactly one of the two steps


def test_dora_step_profiles_and_trains_dora_models(monkeypatch):
    seen = []
    for module in (train_bench, memory):
        monkeypatch.setattr(module, "run_from_args", lambda args, m=module.__name__: seen.append((m, args)))
    for argv in _lora_kernels_commands(_branches()["dora"]):
        cli.main(argv)
    assert [m.rsplit(".", 1)[1] for m, _ in seen] == ["memory", "train_bench"]
    assert all(args.dora for _, args in seen) and seen[1][1].train
