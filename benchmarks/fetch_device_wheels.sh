#!/usr/bin/env bash
# Run on the CPU machine before a device call: puts the wheel the GPU machine lacks (it has no
# network) into .whl/ (git-ignored), for `run` with carry [".whl"]; benchmarks/run_device.sh installs
# it. bitsandbytes 0.50.2 (the NF4 reference and baselines, ~43 MB). pytest-xdist, which the GPU test
# steps use to compile Triton kernels in parallel worker processes, is on the machine already.
# Then benchmarks/prebuild_device_extension.sh puts lora_kernels._C, built here for that machine, beside
# it (the device call then skips compiling csrc/).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-pip}
common=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_24_x86_64 -d .whl)
$PIP download "${common[@]}" bitsandbytes==0.50.2
ls -la .whl
