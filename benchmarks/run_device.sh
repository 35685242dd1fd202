#!/usr/bin/env bash
# One call on a lent GPU machine (no network): put a carried bitsandbytes wheel (.whl/) on the path,
# use the machine's torch/triton, run the tests, the benchmark (with ceilings) and the memory
# profile, write everything under $OUT (default benchmarks/results/device-run) and print a summary.
#   device tool: command "bash benchmarks/run_device.sh", carry [".whl"]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/device-run}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1
nvidia-smi -L | tee "$OUT/nvidia-smi.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python -m pytest tests -q -p no:cacheprovider --junitxml="$OUT/pytest.xml" 2>&1 | tail -25 | tee "$OUT/pytest.txt"
python -m lora_kernels memory --out "$OUT" 2>&1 | tee "$OUT/memory.txt"
python -m lora_kernels bench --out "$OUT" 2>&1 | tee "$OUT/bench.txt"
python -m lora_kernels qlora --out "$OUT" 2>&1 | tee "$OUT/qlora.txt"
