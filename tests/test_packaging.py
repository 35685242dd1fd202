"""setup.py, pyproject.toml and MANIFEST.in: the source distribution builds, holds every tracked file
of the package and of csrc/ (setup.py reads csrc/build_flags.py; the CUDA sources build
lora_kernels._C), and a wheel builds from it with the whole package. Built from a copy of the
tracked files, so the checkout gets no build/ or egg-info."""
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tracked_files() -> list:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout (the tracked files are what a release ships)")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    return [name for name in out.stdout.decode().split("\0") if name and (REPO / name).is_file()]


def _build(kind: str, src: Path, dest: Path) -> Path:
    """setuptools' PEP 517 hook ``build_<kind>`` run in ``src``, as pip and ``python -m build`` run it
    (no CUDA build, even where a CUDA torch and nvcc are present: only the packaging is checked)."""
    pytest.importorskip("setuptools")
    env = dict(os.environ, LORA_KERNELS_SKIP_CUDA_BUILD="1")
    code = f"from setuptools import build_meta; print(build_meta.build_{kind}({str(dest)!r}))"
    run = subprocess.run([sys.executable, "-c", code], cwd=src, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"build_{kind} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return dest / run.stdout.strip().splitlines()[-1]


def test_sdist_holds_the_package_and_csrc_and_builds_a_wheel(tmp_path):
    tracked = _tracked_files()
    checkout = tmp_path / "checkout"
    for name in tracked:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, checkout / name)
    sdist = _build("sdist", checkout, tmp_path / "dist")

    with tarfile.open(sdist) as tar:
        top = Path(tar.getnames()[0]).parts[0]
        shipped = {str(Path(*Path(n).parts[1:])) for n in tar.getnames() if len(Path(n).parts) > 1}
        # the "data" filter where tarfile has it (3.11.4 on), so that no Python warns of the default
        tar.extractall(tmp_path / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    needed = [n for n in tracked if n.startswith(("lora_kernels/", "csrc/"))] + ["setup.py", "pyproject.toml",
                                                                               "README.md"]
    assert "csrc/build_flags.py" in needed
    missing = sorted(set(needed) - shipped)
    assert not missing, f"the sdist lacks {missing}"
    assert not any(n.startswith("tests/") for n in shipped), "the sdist ships (some of) the tests"

    wheel = _build("wheel", tmp_path / "unpacked" / top, tmp_path / "wheels")
    with zipfile.ZipFile(wheel) as whl:
        in_wheel = set(whl.namelist())
    package = [n for n in tracked if n.startswith("lora_kernels/") and n.endswith(".py")]
    assert package and not sorted(set(package) - in_wheel)

    # the wheel alone (no checkout beside it): the package computes, the tools that read csrc/ say so
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as whl:
        whl.extractall(site)
    code = ("import torch, lora_kernels\n"
            "x, W, A, B = torch.randn(3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)\n"
            "y = lora_kernels.lora_linear(x, W, A, B, 0.5)\n"
            "assert torch.allclose(y, x @ W.T + 0.5 * (x @ A.T) @ B.T, atol=1e-5), y\n"
            "assert lora_kernels.__file__.startswith(" + repr(str(site)) + "), lora_kernels.__file__\n"
            "try:\n    import lora_kernels.tools.csrc_check\nexcept ImportError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(env, PYTHONPATH=str(site)),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "needs the repository's csrc/" in run.stdout
