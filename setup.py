"""Build script. The package is pure Python + Triton (JIT-compiled on first use), so a CPU-only
machine installs without any CUDA build, and this script never imports torch where torch is missing.

The hand-written CUDA kernels of ``csrc/`` (every ``csrc/*.cu`` and ``csrc/*.cpp``) are built into the
extension ``lora_kernels._C`` only when all of these hold, otherwise nothing native is built and the
package falls back to its Triton / PyTorch paths:
  * the environment variable LORA_KERNELS_SKIP_CUDA_BUILD is not "1";
  * ``csrc/`` holds at least one .cu or .cpp file;
  * torch is importable *by this script* and is a CUDA build (``torch.version.cuda`` is not None);
  * nvcc is found (``torch.utils.cpp_extension.CUDA_HOME``: $CUDA_HOME, else nvcc on PATH, else
    /usr/local/cuda; an nvcc wrapper script outside the toolkit, like /usr/local/bin/nvcc, is resolved
    to the toolkit). Its major version must match ``torch.version.cuda`` (torch's BuildExtension
    refuses a mismatch: set LORA_KERNELS_SKIP_CUDA_BUILD=1 to install without the extension).

pyproject.toml builds in an isolated environment that holds only setuptools, so a plain
``pip install -e .`` never sees torch and builds nothing native (the CPU / CI path). On a GPU machine
with nvcc, build the extension against the environment's own CUDA torch with

    pip install --no-build-isolation -e .        # needs setuptools (and ideally ninja) installed

Targets sm_80 and sm_90 (SASS for each, no PTX); LORA_KERNELS_CUDA_ARCHS overrides the list, e.g.
"90" or "80 90a" (separators: space, comma or semicolon; "9.0" and "sm_90" are accepted). Flags: -O3,
-lineinfo, the C++ standard torch's headers need (c++17; c++20 from torch 2.13 on), and never
--use_fast_math (the NF4 decode must stay bit-exact); they are defined in csrc/build_flags.py, which
the compile-only check ``python -m lora_kernels.tools.csrc_check`` reads too."""
import glob
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_flags():
    """csrc/build_flags.py (flags, architectures, C++ standard), loaded by path: it is shared with
    lora_kernels.tools.csrc_check, and the package itself cannot be imported here (torch, triton)."""
    spec = importlib.util.spec_from_file_location("lora_kernels_build_flags",
                                                  os.path.join(ROOT, "csrc", "build_flags.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD_FLAGS = _load_build_flags()


def _log(msg: str) -> None:
    print(f"lora_kernels setup.py: {msg}", file=sys.stderr)


def csrc_sources() -> list:
    """Every csrc/*.cu and csrc/*.cpp, relative to this file (setuptools wants relative paths)."""
    found = glob.glob(os.path.join(ROOT, "csrc", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
    return sorted(os.path.relpath(p, ROOT) for p in found)


def csrc_headers() -> list:
    """Every csrc/*.cuh (the kernels and what the sources share), relative to this file."""
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cuh")))


def _is_cuda_home(home: str) -> bool:
    return os.path.isfile(os.path.join(home, "bin", "nvcc")) and \
        os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h"))


def _fix_cuda_home() -> None:
    """Without $CUDA_HOME torch takes the parent of the dir of the nvcc on PATH; when that nvcc is a
    wrapper outside the toolkit (e.g. /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc), that
    dir has no CUDA headers or libraries: point $CUDA_HOME at the real toolkit (before torch reads it)."""
    nvcc = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or not nvcc \
            or _is_cuda_home(os.path.dirname(os.path.dirname(nvcc))):
        return
    for home in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        if _is_cuda_home(home):
            _log(f"{nvcc} is not inside a CUDA toolkit: using CUDA_HOME={home}")
            os.environ["CUDA_HOME"] = home
            return


def cuda_extension_kwargs() -> dict:
    """ext_modules and cmdclass for setup(), or {} when the CUDA extension is not to be built."""
    if os.environ.get("LORA_KERNELS_SKIP_CUDA_BUILD") == "1":
        _log("LORA_KERNELS_SKIP_CUDA_BUILD=1: not building the CUDA extension")
        return {}
    sources = csrc_sources()
    if not sources:
        return {}
    try:
        import torch
    except ImportError:  # the CPU / isolated-build path: pure Python install
        _log("torch is not importable here (isolated build?): not building the CUDA extension; "
             "use `pip install --no-build-isolation -e .` in an environment with a CUDA torch and nvcc")
        return {}
    if torch.version.cuda is None:
        _log(f"torch {torch.__version__} is not a CUDA build: not building the CUDA extension")
        return {}
    _fix_cuda_home()  # import torch does not import torch.utils.cpp_extension, which reads $CUDA_HOME
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    # CUDA_HOME is torch's own search ($CUDA_HOME / $CUDA_PATH, nvcc on PATH, /usr/local/cuda; read
    # when torch.utils.cpp_extension is first imported, after _fix_cuda_home);
    # CUDAExtension needs it, so nvcc on PATH alone is not enough when torch did not find it.
    if CUDA_HOME is None:
        hint = f" (nvcc on PATH: {shutil.which('nvcc')}; set CUDA_HOME)" if shutil.which("nvcc") else ""
        _log(f"nvcc not found{hint}: not building the CUDA extension")
        return {}
    archs = BUILD_FLAGS.cuda_archs()
    std = BUILD_FLAGS.cxx_std(torch.__version__)
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    _log(f"building lora_kernels._C from {', '.join(sources)} for sm_{', sm_'.join(archs)} "
         f"(torch {torch.__version__}, CUDA {torch.version.cuda}, nvcc in {CUDA_HOME})")
    ext = CUDAExtension(
        name="lora_kernels._C",
        sources=sources,
        depends=csrc_headers(),  # without ninja's dependency files, header edits rebuild through these
        extra_compile_args={
            "cxx": BUILD_FLAGS.OPT_FLAGS + [f"-std={std}", abi, BUILD_FLAGS.archs_define(archs)],
            "nvcc": BUILD_FLAGS.OPT_FLAGS + BUILD_FLAGS.NVCC_FLAGS + [f"-std={std}", abi]
            + BUILD_FLAGS.gencode_flags(archs),
        },
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(packages=find_packages(include=["lora_kernels", "lora_kernels.*"]), **cuda_extension_kwargs())
