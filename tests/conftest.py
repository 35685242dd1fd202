"""Test setup. Without a GPU the Triton kernels run under the interpreter: TRITON_INTERPRET must be
set before triton is imported, so it is set here, before anything imports lora_kernels."""
import os
import shutil
import subprocess

def _has_cuda_gpu() -> bool:
    # No torch import here (importing torch is fine, but keep the decision cheap and explicit).
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


if not _has_cuda_gpu():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# tests.helpers.poisoned_memory turns on torch.use_deterministic_algorithms; torch releases before
# ~2.10 then refuse every cuBLAS matmul on CUDA unless this is set before cuBLAS starts (harmless on CPU).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# CI runs a fixed set of hypothesis examples (a red CI must mean a regression, and it must be
# reproducible); local runs draw fresh examples each time.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")

import pytest  # noqa: E402


def _interpreter_numpy_problem(triton_version: str, numpy_version: str):
    """Why this triton's interpreter cannot run with this numpy, or None. Triton 3.6 and older turn
    a 1-element array into an int with int(array), which numpy 2.4 rejects ("only 0-dimensional
    arrays can be converted to Python scalars", inside every kernel loop); 3.7 squeezes first."""
    def major_minor(v):
        return tuple(int(p) for p in v.split("+")[0].split(".")[:2])
    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"the Triton interpreter of triton {triton_version} fails with numpy {numpy_version}: "
                "install numpy<2.4 (or triton>=3.7) to run the tests without a GPU")
    return None


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") == "1":
        import numpy
        import triton

        problem = _interpreter_numpy_problem(triton.__version__, numpy.__version__)
        if problem:
            raise pytest.UsageError(problem)


@pytest.fixture(params=["triton", "torch"])
def cpu_backend(request, monkeypatch):
    """Both CPU backends of the public functions: the Triton kernels under the interpreter, and the
    lean PyTorch path (LORA_KERNELS_CPU_BACKEND is read per call)."""
    from lora_kernels.ops.triton_launch import is_interpreted

    if request.param == "triton" and not is_interpreted():
        pytest.skip("the CPU Triton backend needs TRITON_INTERPRET=1")
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", request.param)
    return request.param


# After TRITON_INTERPRET is settled above: tests.helpers imports lora_kernels (and so triton).
from tests.helpers import BACKENDS, poisoned_memory, use_backend  # noqa: E402


@pytest.fixture
def poisoned():
    """Memory allocated during the test starts poisoned (``tests.helpers.poisoned_memory``): an output
    a kernel forgets to write cannot pass for zeros. Modules use it with ``usefixtures``."""
    with poisoned_memory():
        yield


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each backend of the public functions (``tests.helpers.BACKENDS``: Triton, the PyTorch path, CUDA
    where present), as a ``BackendRecord`` of what ran. tests/modules overrides it with the CPU pair."""
    with use_backend(request.param) as record:
        yield record
