"""Thin entry point: ``python benchmarks/bench_lora_linear.py [bench options]`` (see
``python -m lora_kernels bench --help``)."""
import sys
from pathlib import Path

# Run from a checkout without installing: put the repository root on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_kernels.tools.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
