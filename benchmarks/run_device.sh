#!/usr/bin/env bash
# One call on a lent GPU machine (no network): put a carried bitsandbytes wheel (.whl/) on the path,
# use the machine's torch/triton, then run the requested steps (default: all), writing everything
# under $OUT (default benchmarks/results/device-run) and printing a summary per step.
#   device tool: command "bash benchmarks/run_device.sh [steps]", carry [".whl"]
#   steps: build tests sanitizer bench qlora memory train variants split-k csrc (each under its own time limit, so
#   that one slow step cannot use up a 10-minute call; split them over calls when the GPU is slow to
#   compile). "build" compiles csrc/ into lora_kernels._C in place (the later steps then use the CUDA
#   NF4 GEMV where they ask for it); "sanitizer" runs its tests under compute-sanitizer memcheck.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/device-run}
STEPS=${*:-build tests sanitizer bench qlora memory train variants split-k}
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
        build) timeout 400 python setup.py build_ext --inplace 2>&1 | tail -15 | tee "$OUT/build.txt"
               python -c "from lora_kernels.ops.nf4_gemv import load_extension as l; print('lora_kernels._C loaded:', l())" ;;
        sanitizer) timeout 300 compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest -q -x \
                       -p no:cacheprovider tests/ops/test_nf4_gemv.py -k cuda 2>&1 \
                       | tail -15 | tee "$OUT/sanitizer.txt" ;;
        csrc) timeout 240 python -m lora_kernels.tools.csrc_check --json "$OUT/csrc_check.json" 2>&1 \
                  | tee "$OUT/csrc_check.txt" ;;
        tests) timeout 240 python -m pytest tests -q -x -p no:cacheprovider --junitxml="$OUT/pytest.xml" 2>&1 \
                   | tail -25 | tee "$OUT/pytest.txt" ;;
        memory) timeout 400 python -m lora_kernels memory --out "$OUT" 2>&1 | tee "$OUT/memory.txt"
                timeout 120 python -m lora_kernels memory --layer --out "$OUT" 2>&1 | tee "$OUT/memory_layer.txt" ;;
        bench) timeout 300 python -m lora_kernels bench --family dense --out "$OUT" 2>&1 | tee "$OUT/bench.txt" ;;
        train) timeout 300 python -m lora_kernels bench --train --out "$OUT" 2>&1 | tee "$OUT/train.txt" ;;
        variants) timeout 240 python -m lora_kernels bench --family dense --model 8b --m 4096,8192 \
                      --providers lora_kernels,lora_kernels_dylora,lora_kernels_adalora,base --out "$OUT" 2>&1 \
                      | tee "$OUT/variants.txt" ;;
        qlora|split-k) timeout 240 python -m lora_kernels "$step" --out "$OUT" 2>&1 | tee "$OUT/$step.txt" ;;
        *) echo "unknown step $step" ;;
    esac
done
