"""Build script. The package is pure Python + Triton (JIT-compiled on first use), so a CPU-only
machine installs without any CUDA build. ``csrc/`` CUDA extensions are built only when
LORA_KERNELS_BUILD_CUDA=1 and nvcc plus a CUDA torch are present (none exist yet: issue 5)."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["lora_kernels", "lora_kernels.*"]))
