"""Host-side runs of the Triton route without a GPU, and Triton launch counting.

``dry_run()`` makes a machine without a GPU take the path a CUDA call takes through the Python
launchers and Triton's own dispatch (argument binding, specialization, kernel cache), with every
kernel compiled ahead of time for a GPU target (sm_90 by default, as ``aot_check`` does) and its
launch recorded instead of run. What it measures is host time only: outputs are left unwritten
(``torch.empty``), and PyTorch ops run on the CPU tensors. It exists to time and count what a call
costs on the host side, which is what decides small-M calls and small layers on a GPU, where the
device finishes its work before the host has queued the next launch.

``count_launches()`` counts Triton launches on any machine (real GPU launches included).

Both reach into Triton's runtime (``driver.set_active``, the compiled kernel's launcher and loader):
checked with triton 3.6 and 3.9; a Triton that no longer fits raises ``DryRunUnavailable``.
"""
import contextlib
from collections import Counter
from typing import Iterator

import torch


class DryRunUnavailable(RuntimeError):
    """This Triton's runtime does not offer what the dry run replaces."""


class _FakeUtils:
    """What the compiled kernel asks the driver's utils for: device limits (those of an H100/H200) and
    a loaded module handle (none: nothing is loaded)."""

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
                "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    def load_binary(self, name, kernel, shared, device):
        return 0, 0, 0, 0, 1024  # module, function, registers, spills, max threads per block


class _RecordingDriver:
    """A stand-in for Triton's CUDA driver: reports one device of ``target``, launches nothing and
    records each launch's kernel name in ``launches``. Its launcher reads every tensor argument's
    data pointer, as the C launcher does."""

    def __init__(self, target, launches: Counter):
        self.utils = _FakeUtils()
        self._target = target
        class _Launcher:
            def __init__(self, src, metadata):
                self.name = getattr(src, "name", None) or getattr(metadata, "name", "?")

            def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook,
                         exit_hook, *args):
                for a in args:
                    if isinstance(a, torch.Tensor):
                        a.data_ptr()
                launches[self.name] += 1

        self.launcher_cls = _Launcher

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self._target

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def dry_run(arch: int = 90) -> Iterator[Counter]:
    """Within the block, CPU calls of lora_kernels take the Triton route (compiled for sm_``arch``,
    launches recorded, not run): yields a Counter of launches by kernel name. Only without a GPU."""
    if torch.cuda.is_available():
        raise RuntimeError("dry_run is for machines without a GPU: with one, time the real launches")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver
        from lora_kernels.ops import triton_launch
    except ImportError as exc:
        raise DryRunUnavailable(f"triton's runtime does not fit the dry run: {exc}") from exc
    if triton_launch.is_interpreted():
        raise DryRunUnavailable("TRITON_INTERPRET=1: kernels run in the interpreter, there is nothing to dry-run")
    if not hasattr(driver, "set_active"):
        raise DryRunUnavailable("triton.runtime.driver has no set_active")
    launches: Counter = Counter()
    previous = getattr(driver, "_active", None)  # reset_active() would look for a real GPU driver
    driver.set_active(_RecordingDriver(GPUTarget("cuda", arch, 32), launches))
    try:
        with _triton_backend_on_cpu():
            yield launches
    finally:
        driver.set_active(previous)


@contextlib.contextmanager
def _triton_backend_on_cpu():
    """The ops' backend rule answers for CPU tensors as for CUDA ones inside the block."""
    from lora_kernels.ops.checks import CPU_AS_CUDA

    CPU_AS_CUDA[0] = True
    try:
        yield
    finally:
        CPU_AS_CUDA[0] = False


@contextlib.contextmanager
def count_launches() -> Iterator[Counter]:
    """Counts Triton kernel launches (by kernel name) inside the block, on any device: those through
    ``kernel[grid]`` (JITFunction.run) and the fast ones of ``ops.launch``."""
    from triton.runtime.jit import JITFunction
    from lora_kernels.ops import launch as launch_mod

    launches: Counter = Counter()
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            launches[self.__name__] += 1
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    JITFunction.run = run
    launch_mod.FAST_LAUNCH_COUNTERS.append(launches)
    try:
        yield launches
    finally:
        JITFunction.run = original
        launch_mod.FAST_LAUNCH_COUNTERS.remove(launches)
