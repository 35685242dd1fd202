"""Set-up of the pytest-benchmark suite (``pytest benchmarks/`` from the repository root): the
checkout goes on ``sys.path`` so that ``lora_kernels`` imports without installing. This directory is
outside the test suite's ``testpaths`` (pyproject.toml), so a plain ``pytest`` never collects it."""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
