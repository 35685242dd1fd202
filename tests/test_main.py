"""``python -m lora_kernels``: option values the tools reject end as one argparse-style error line
(exit status 2, no traceback), naming the tool and where the check was raised."""
import subprocess
import sys

import pytest
import torch

from lora_kernels.__main__ import main


@pytest.mark.parametrize("argv, message", [
    (["bench", "--device", "cpu", "--providers", "nope"], "providers must be a non-empty list"),
    (["gemv", "--device", "cpu", "--m", "99"], "ms must be values in [1, 16]"),
    (["analyze", "/nonexistent/adapter"], "adapter_dir must be a PEFT adapter folder"),
    (["bench", "--device", "foo"], "device must be a torch device"),
    (["bench", "--device", "cpu", "--train", "--shapes", "1,2,3,4", "--family", "nf4"],
     "--shapes, --family apply to the layer benchmark, not to --train"),
    (["bench", "--device", "cpu", "--preset", "tiny", "--steps", "2"], "--preset, --steps apply to --train only"),
    (["split-k", "--device", "cpu", "--reps", "0"], "reps must be >= 1"),
    (["memory", "--device", "cpu", "--layer", "--dora", "--preset", "tiny"],
     "--preset, --dora apply to the model profile, not to --layer"),
    (["memory", "--device", "cpu", "--seq", "1", "--variants", "peft"], "seq must be an int >= 2"),
    *([(["memory", "--device", "cuda"], "no CUDA GPU is available")] if not torch.cuda.is_available() else []),
])
def test_rejected_option_values_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"python -m lora_kernels {argv[0]}: error: " in err and message in err and "raised at " in err
    assert "Traceback" not in err


def test_error_from_the_command_line_has_no_traceback():
    run = subprocess.run([sys.executable, "-m", "lora_kernels", "gemv", "--device", "cpu", "--m", "99"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert "error: ms must be values" in run.stderr and "Traceback" not in run.stderr


def test_other_exceptions_keep_their_traceback(monkeypatch):
    # only rejected values are shortened: a failure of another kind is not hidden
    from lora_kernels.tools import gemv_bench

    def broken(args):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(gemv_bench, "run_from_args", broken)
    with pytest.raises(RuntimeError, match="kernel exploded"):
        main(["gemv", "--device", "cpu"])
