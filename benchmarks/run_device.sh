#!/usr/bin/env bash
# One call on a lent GPU machine (no network): put a carried bitsandbytes wheel (.whl/) on the path,
# use the machine's torch/triton, then run the requested steps (default: all), writing everything
# under $OUT (default benchmarks/results/device-run) and printing a summary per step.
#   device tool: command "bash benchmarks/run_device.sh [steps]", carry [".whl"]
#   steps: tests bench memory qlora split-k (each under its own time limit, so that one slow step
#   cannot use up a 10-minute call; split them over calls when the GPU is slow to compile)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/device-run}
STEPS=${*:-tests bench memory qlora split-k}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1
nvidia-smi -L | tee "$OUT/nvidia-smi.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for step in $STEPS; do
    echo "=== $step"
    case $step in
        tests) timeout 240 python -m pytest tests -q -x -p no:cacheprovider --junitxml="$OUT/pytest.xml" 2>&1 \
                   | tail -25 | tee "$OUT/pytest.txt" ;;
        bench|memory|qlora|split-k) timeout 240 python -m lora_kernels "$step" --out "$OUT" 2>&1 | tee "$OUT/$step.txt" ;;
        *) echo "unknown step $step" ;;
    esac
done
