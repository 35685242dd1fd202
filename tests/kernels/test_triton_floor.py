"""The triton floor: pyproject.toml's, the one lora_kernels checks at import, and a clear error below it."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lora_kernels.kernels import MIN_TRITON, major_minor

ROOT = Path(__file__).resolve().parents[2]


def _import_with_triton_version(version: str) -> subprocess.CompletedProcess:
    code = f"import triton; triton.__version__ = {version!r}; import lora_kernels"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_pyproject_declares_the_floor_the_package_checks():
    text = (ROOT / "pyproject.toml").read_text()
    declared = re.search(r'"triton>=(\d+)\.(\d+)"', text)
    assert declared, "pyproject.toml declares no triton floor"
    assert (int(declared.group(1)), int(declared.group(2))) == MIN_TRITON


@pytest.mark.parametrize("version, expected", [("3.4.0", (3, 4)), ("3.6.0+git1a2b3c", (3, 6)), ("10.12", (10, 12))])
def test_version_tuple(version, expected):
    assert major_minor(version) == expected


def test_version_tuple_rejects_an_unreadable_version():
    with pytest.raises(ImportError, match="cannot read the version"):
        major_minor("main")


def test_import_below_the_floor_names_the_triton_needed():
    below = f"{MIN_TRITON[0]}.{MIN_TRITON[1] - 1}.1"
    failed = _import_with_triton_version(below)
    assert failed.returncode != 0
    assert f"lora_kernels needs triton >= {MIN_TRITON[0]}.{MIN_TRITON[1]}" in failed.stderr
    assert f"found triton {below}" in failed.stderr
    at_floor = _import_with_triton_version(f"{MIN_TRITON[0]}.{MIN_TRITON[1]}.0")
    assert at_floor.returncode == 0, at_floor.stderr
