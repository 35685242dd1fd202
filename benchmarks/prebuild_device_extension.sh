#!/usr/bin/env bash
# Run on the CPU machine before a device call, after fetch_device_wheels.sh: builds lora_kernels._C as
# the GPU machine would (its torch wheel, Python 3.12, nvcc 13.0, SASS for sm_90) and packs it into
# .whl/ (lora_kernels.tools.prebuilt_extension), so that run_device.sh's build step installs it instead
# of spending a minute or more of the device call in nvcc. It is used there only when csrc/, torch,
# Python and the GPU match; otherwise that step compiles as before.
#   First run: a venv with the GPU machine's torch (a ~3 GB CUDA wheel from PyPI, ~2-4 min), kept in
#   $VENV for later runs; the build: ~5 min on 2 cores.
#   PY (python3.12), TORCH_SPEC (torch==2.11.0: the GPU machine's 2.11.0+cu130), ARCHS (90), VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3.12}
TORCH_SPEC=${TORCH_SPEC:-torch==2.11.0}
ARCHS=${ARCHS:-90}
VENV=${VENV:-/tmp/lk-device-build-venv}
if ! "$VENV/bin/python" -c "import torch, setuptools" 2>/dev/null; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q "$TORCH_SPEC" setuptools ninja numpy
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# the tree the extension is built from: what setup.py reads, and the package (the build writes into it)
cp -r setup.py pyproject.toml csrc "$work"/
mkdir "$work/lora_kernels" && cp -r lora_kernels/. "$work/lora_kernels/" && rm -f "$work"/lora_kernels/_C*.so
(cd "$work" && LORA_KERNELS_CUDA_ARCHS="$ARCHS" "$VENV/bin/python" setup.py build_ext --inplace > build.log 2>&1) \
    || { tail -30 "$work/build.log"; exit 1; }
echo "built: $(ls "$work"/lora_kernels/_C*.so)"
# pack from this tree (the package's own tool, by the build venv's Python and torch); the digest is of $work
PYTHONPATH="$PWD" "$VENV/bin/python" -m lora_kernels.tools.prebuilt_extension pack \
    --so "$(ls "$work"/lora_kernels/_C*.so)" --root "$work" --archs $ARCHS --dest .whl
ls -la .whl
