"""Kernel launches with less host time: ``launch(kernel, grid, *args, **kwargs)`` does what
``kernel[grid](*args, **kwargs)`` does.

Why: a Triton launch spends ~15-40 us of host time in ``JITFunction.run`` before the driver call
(binding ~50 arguments to the signature, specializing each, building a string cache key from the
options), measured on a CPU with ``tools.dry_run``; a small layer's forward and backward make five
of them, and on a GPU such calls are bound by host time. After the first launch of a
specialization, ``launch`` keeps the compiled kernel under a key of its own and calls its launcher
directly: about a third of the host time of ``kernel[grid]``.

The key decides which compiled kernel runs, so it distinguishes at least what Triton's
specialization does (checked against Triton's own choice by ``tools.launch_check`` in CI, with
triton 3.6 and 3.9, and per argument kind in tests/ops/test_launch.py): per tensor argument its dtype and whether its address is 16-byte aligned; per int
whether it is 1, a multiple of 16, and which of i32 / i64 / u64 holds it; floats, bools and None by
type (None, bools by value); every keyword argument (constexprs and launch options) by value.
Anything else (a TensorDescriptor, a tuple argument), an interpreted kernel (TRITON_INTERPRET=1),
launch hooks installed (profilers such as proton add to ``triton.knobs.runtime.launch_enter_hook``)
or LORA_KERNELS_FAST_LAUNCH=0 take ``kernel[grid]`` itself. A compiled kernel is kept for the
process: options read by Triton from its environment (TRITON_DEBUG, ...) and changed after a first
launch do not reach kernels already launched.
"""
import os
import threading

import torch

# "0": every launch through kernel[grid]; "check": each fast launch also asks Triton which compiled
# kernel and argument values it would launch and raises if they differ; else "1". Read when this
# module is imported (a per-call environment read would cost a microsecond per launch); set MODE[0]
# to change it in a running process.
FAST_LAUNCH_ENV = "LORA_KERNELS_FAST_LAUNCH"
MODE = [os.environ.get(FAST_LAUNCH_ENV, "1")]



class _NotKeyable(Exception):
    pass


def _args_key(args: tuple, _int=int, _float=float, _bool=bool, _none=type(None), _tensor=torch.Tensor,
              _param=torch.nn.Parameter) -> tuple:
    """What Triton specializes the runtime arguments on (or more), one entry per argument: an int's
    is "one", or a code of divisibility by 16 (bit 0) and the type holding it (i32 0, i64 2, u64 4);
    a tensor's its dtype and whether its address is 16-byte aligned. (One loop with local names: it
    runs for every argument of every launch.)"""
    key = []
    append = key.append
    for a in args:
        t = type(a)
        if t is _int:
            append("one" if a == 1 else
                   (not a & 15) + (0 if -2147483648 <= a <= 2147483647 else 2 if a <= 9223372036854775807 else 4))
        elif t is _tensor or t is _param:
            append((a.dtype, not a.data_ptr() & 15))
        elif t is _float or t is _none:
            append(t)
        elif t is _bool:
            append("true" if a else "false")
        elif isinstance(a, _tensor):
            append((a.dtype, not a.data_ptr() & 15))
        else:
            raise _NotKeyable
    return tuple(key)


class _KernelLaunches:
    """Per JIT kernel: by key, the compiled kernel and the values of the parameters that follow the
    positional arguments (keyword arguments and defaults: part of the key, so fixed with it)."""

    def __init__(self, kernel):
        self.compiled = {}
        self.params = kernel.params

    def tail_values(self, n_args: int, kwargs: dict) -> tuple:
        return tuple(kwargs[p.name] if p.name in kwargs else p.default for p in self.params[n_args:])


_LAUNCHES: dict = {}  # id(JIT kernel) -> _KernelLaunches (a JITFunction hashes its source key: slow)
CHECKED_LAUNCHES = [0]  # fast launches compared with Triton's own choice (LORA_KERNELS_FAST_LAUNCH=check)
# Counters (collections.Counter) that count fast launches by kernel name while registered
# (tools.dry_run.count_launches; launches through kernel[grid] it counts in JITFunction.run).
FAST_LAUNCH_COUNTERS: list = []
_RUNTIME: list = []  # [JITFunction, driver, knobs.runtime, InterpretedFunction], filled on first use


# Triton's interpreter is not thread-safe: it keeps the program id of the block it runs in a global and
# patches triton.language for the length of a launch (the first launch to end undoes it). Launches from
# several threads (a server's thread pool, nn.DataParallel) gave wrong values and InterpreterErrors.
_INTERPRETER_LOCK = threading.Lock()


def _new_interpreter_lock() -> None:
    global _INTERPRETER_LOCK
    _INTERPRETER_LOCK = threading.Lock()  # a child forked while another thread held the lock: not held there


os.register_at_fork(after_in_child=_new_interpreter_lock)


def _runtime() -> list:
    if not _RUNTIME:  # imported on first launch, not at import time
        from triton import knobs
        from triton.runtime import driver
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
        _RUNTIME.extend((JITFunction, driver, knobs.runtime, InterpretedFunction))
    return _RUNTIME


def _no_hooks(chain) -> bool:
    """Whether a Triton launch hook (a HookChain in triton 3.6 and 3.9, else None or a function) is
    empty: then passing None instead changes nothing."""
    return chain is None or getattr(chain, "calls", None) == []


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; grid: a tuple of 1 to 3 ints."""
    jit_function, driver, hooks, interpreted_function = _runtime()
    if type(kernel) is interpreted_function:
        with _INTERPRETER_LOCK:
            kernel[grid](*args, **kwargs)
        return
    mode = MODE[0]
    if (type(kernel) is not jit_function or mode == "0"
            or not (_no_hooks(hooks.launch_enter_hook) and _no_hooks(hooks.launch_exit_hook))):
        kernel[grid](*args, **kwargs)
        return
    device = driver.active.get_current_device()
    try:
        key = (device, _args_key(args), tuple(kwargs.items()))
        entry = _LAUNCHES.get(id(kernel))
        if entry is None:
            entry = _LAUNCHES[id(kernel)] = _KernelLaunches(kernel)
        compiled = entry.compiled.get(key)
    except (_NotKeyable, TypeError):  # an argument of another kind, an unhashable keyword value
        kernel[grid](*args, **kwargs)
        return
    if compiled is None:
        # Triton binds, specializes, compiles if needed and launches; its choice is kept for the key.
        kernel_of_key = kernel[grid](*args, **kwargs)
        if kernel_of_key is not None:
            entry.compiled[key] = (kernel_of_key, entry.tail_values(len(args), kwargs))
        return
    compiled, tail = compiled
    if mode == "check":
        _check_against_triton(kernel, device, compiled, args, tail, kwargs)
    for counter in FAST_LAUNCH_COUNTERS:
        counter[kernel.__name__] += 1
    n = len(grid)
    compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, driver.active.get_current_stream(device),
                 compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)


def _check_against_triton(kernel, device, compiled, args: tuple, tail: tuple, kwargs: dict) -> None:
    """Raises RuntimeError unless Triton, given the same arguments, picks ``compiled`` and binds the
    values ``args + tail`` (its binder: internal to triton, here only)."""
    expected = kernel.run(*args, grid=(1,), warmup=True, **kwargs)
    bound = tuple(kernel.device_caches[device][-1](*args, **kwargs)[0].values())
    same_values = len(bound) == len(args) + len(tail) and all(
        b is v or (not isinstance(b, torch.Tensor) and type(b) is type(v) and b == v) for b, v in zip(bound, args + tail))
    if expected is not compiled or not same_values:
        raise RuntimeError(f"fast launch of {kernel.__name__}: Triton would launch "
                           f"{'another compiled kernel' if expected is not compiled else 'other argument values'}")
    CHECKED_LAUNCHES[0] += 1
