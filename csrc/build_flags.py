"""How ``lora_kernels._C`` is compiled, defined once for the two programs that compile ``csrc/``:
``setup.py`` (builds the extension on a CUDA machine) and ``lora_kernels.tools.csrc_check`` (compiles
the same sources without a GPU in CI, with the same flags). Standard library only: setup.py loads
this file by path, before torch or the package can be imported.

torch's BuildExtension adds on its own -DTORCH_API_INCLUDE_EXTENSION_H, -DTORCH_EXTENSION_NAME=_C,
torch's COMMON_NVCC_FLAGS (no half / bfloat16 operators and conversions, --expt-relaxed-constexpr)
and -fPIC; csrc_check adds those by hand.
"""
import glob
import hashlib
import os
import re

DEFAULT_CUDA_ARCHS = ("80", "90")
CUDA_ARCHS_ENV = "LORA_KERNELS_CUDA_ARCHS"
OPT_FLAGS = ["-O3"]
NVCC_FLAGS = ["-lineinfo"]  # never --use_fast_math: the NF4 decode is bit-exact


def cuda_archs(spec=None) -> list:
    """Architectures from $LORA_KERNELS_CUDA_ARCHS (or ``spec``): "80 90", "90a", "8.0;9.0", "sm_90"
    (separators: space, comma or semicolon); the default list when empty."""
    spec = os.environ.get(CUDA_ARCHS_ENV, "") if spec is None else spec
    archs = []
    for item in re.split(r"[\s,;]+", spec.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(?:sm_|compute_)?(\d+)\.?(\d)?([af]?)", item)
        if not m:
            raise ValueError(f"{CUDA_ARCHS_ENV}: cannot parse {item!r} (expected e.g. 80, 90a, 9.0)")
        archs.append(m.group(1) + (m.group(2) or "") + m.group(3))
    return archs or list(DEFAULT_CUDA_ARCHS)


def gencode_flags(archs) -> list:
    """SASS for each architecture, no PTX."""
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def archs_define(archs) -> str:
    """The define that tells bindings.cpp which architectures the kernels were built for (exported as
    ``lora_kernels._C.cuda_archs``, "80_90"): SASS runs only on its own major version, so the package
    sends a GPU the kernels only when a build for it is there. One preprocessing-number token (digits,
    letters, underscores): no quoting through the build tools' shells."""
    return "-DLORA_KERNELS_CUDA_ARCHS=" + "_".join(str(a) for a in archs)


def cxx_std(torch_version: str) -> str:
    """The C++ standard for torch's headers: torch >= 2.13 needs C++20 (2.14 #errors on C++17)."""
    m = re.match(r"(\d+)\.(\d+)", torch_version)
    return "c++20" if m and (int(m.group(1)), int(m.group(2))) >= (2, 13) else "c++17"


def source_digest(root: str) -> str:
    """sha256 of everything a build of ``lora_kernels._C`` reads from the repository at ``root``:
    csrc/'s sources and headers (*.cu, *.cuh, *.cpp), this file and setup.py (names and bytes). A
    prebuilt extension is used only where this matches (lora_kernels.tools.prebuilt_extension)."""
    paths = sorted(glob.glob(os.path.join(root, "csrc", "*.cu")) + glob.glob(os.path.join(root, "csrc", "*.cuh"))
                   + glob.glob(os.path.join(root, "csrc", "*.cpp"))
                   + [os.path.join(root, "csrc", "build_flags.py"), os.path.join(root, "setup.py")])
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        digest.update(f"{os.path.relpath(path, root)}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()
