#!/usr/bin/env bash
# Run on the CPU machine before a device call: puts the wheels the GPU machine lacks (it has no
# network) into .whl/ (git-ignored), for `run` with carry [".whl"]; benchmarks/run_device.sh installs
# them. bitsandbytes 0.50.2 (the NF4 reference and baselines, ~43 MB) and pytest-xdist + execnet
# (the GPU test step then compiles Triton kernels in parallel worker processes).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-pip}
common=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_24_x86_64 -d .whl)
$PIP download "${common[@]}" bitsandbytes==0.50.2
$PIP download "${common[@]}" pytest-xdist execnet
ls -la .whl
