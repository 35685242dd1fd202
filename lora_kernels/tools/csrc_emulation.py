"""The CUDA kernels of ``csrc/`` run on a CPU, for the tests: ``csrc/emulation/harness.cpp`` compiles
the kernels' own source with the host C++ compiler against a CPU emulation of the CUDA features they
use (``csrc/emulation/cuda_emulation.h``: every CUDA thread a fiber, strict about barriers, cp.async
ordering, and reads outside the inputs), and this module calls it with ctypes on CPU tensors.

    nf4_gemv_lora(<the op lora_kernels::nf4_gemv_lora's arguments>, kernel=0, *, sms=3,
                  shared_optin=H100_SHARED_OPTIN) -> (y [M, N], h [M, r])
    nf4_dequantize_slab(<the op lora_kernels::nf4_dequantize_slab's arguments>) -> Tensor
    nf4_grad_input(<the op lora_kernels::nf4_grad_input's arguments>, *, sms=3) -> Tensor

Same arguments and results as the ops (``lora_kernels/ops/nf4_gemv.py``), so a test can run a kernel
on a CPU where it would run the op on a GPU. ``sms`` and ``shared_optin`` stand for the device's
multiprocessor count and opt-in shared memory per block (the tensor-core GEMV's grid and ring depth:
a few SMs make each block loop over several tiles). Every buffer is copied between guard bands
(NaN, or 0xff bytes): a kernel reading past an input reads NaN, and one writing past an output is
reported. The library is built once per content of its sources (about 10 s) into a cache directory
($LORA_KERNELS_EMULATION_CACHE, default under the temp dir). ``available()`` says why it cannot be
built (no host C++ compiler or no CUDA headers: the headers come with nvcc).
"""
import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import Optional

import torch

from lora_kernels.ops.nf4 import NF4Tensors
from lora_kernels.ops.nf4_gemv import GEMV_MAX_RANK, GEMV_MAX_ROWS, MMA_SHARED_BYTES, mma_weight_ok
from lora_kernels.tools.csrc_check import DEFAULT_CSRC, cuda_include_dir, find_nvcc

CACHE_ENV = "LORA_KERNELS_EMULATION_CACHE"
H100_SHARED_OPTIN = 232448  # opt-in shared memory per block of an H100 / H200 (227 KiB): 3 ring stages
A100_SHARED_OPTIN = 166912  # an A100's (163 KiB): 2 ring stages
CXX_FLAGS = ("-std=c++17", "-O1", "-fPIC", "-shared", "-Wall", "-Wno-unknown-pragmas",
             # IEEE single precision as the kernels spell it: no contraction into FMAs (nvcc contracts
             # the GEMVs' accumulations, a rounding difference the tests' bounds allow), and the
             # kernels' type punning through vector types
             "-ffp-contract=off", "-fno-fast-math", "-fno-strict-aliasing")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # lora_kernels::StoredDtype
GUARD_BYTES = 256  # a multiple of 64: the guarded copy keeps the allocation's alignment


class EmulationUnavailable(RuntimeError):
    """The emulation library cannot be built here (the message says why)."""


class _NF4(ctypes.Structure):  # NF4Buffers of harness.cpp
    _fields_ = [("packed", ctypes.c_void_p), ("packed_bytes", ctypes.c_int64),
                ("absmax", ctypes.c_void_p), ("absmax_bytes", ctypes.c_int64),
                ("absmax_code", ctypes.c_void_p), ("absmax_scale", ctypes.c_void_p),
                ("absmax_scale_count", ctypes.c_int64), ("absmax_offset", ctypes.c_void_p),
                ("code", ctypes.c_void_p), ("log2_blocksize", ctypes.c_int32),
                ("log2_nested_blocksize", ctypes.c_int32), ("stored", ctypes.c_int32),
                ("double_quant", ctypes.c_int32)]


def _sources(csrc: str) -> list:
    """The files the library is built from: the kernel headers and csrc/emulation/."""
    emulation = os.path.join(csrc, "emulation")
    return sorted([os.path.join(csrc, f) for f in os.listdir(csrc) if f.endswith(".cuh")] +
                  [os.path.join(emulation, f) for f in os.listdir(emulation)])


def _toolchain():
    """(c++ compiler, CUDA include dir), or EmulationUnavailable."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise EmulationUnavailable("no host C++ compiler (c++, g++ or $CXX)")
    nvcc = find_nvcc()
    include = cuda_include_dir(nvcc) if nvcc else None
    if include is None:
        raise EmulationUnavailable("no CUDA toolkit headers (cuda_fp16.h, cuda_bf16.h; they come with nvcc)")
    return cxx, include


@functools.lru_cache(maxsize=None)
def library(csrc: str = DEFAULT_CSRC) -> ctypes.CDLL:
    """The emulation library, built if its cached copy is missing (EmulationUnavailable otherwise)."""
    cxx, include = _toolchain()
    digest = hashlib.sha256()
    for path in _sources(csrc):
        digest.update(path.encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(" ".join((cxx, include, *CXX_FLAGS)).encode())
    cache = os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), f"lora_kernels_emulation_{os.getuid()}")
    os.makedirs(cache, exist_ok=True)
    target = os.path.join(cache, f"harness-{digest.hexdigest()[:20]}.so")
    if not os.path.exists(target):
        partial = f"{target}.{os.getpid()}.tmp"  # concurrent builders (pytest-xdist) each write their own
        cmd = [cxx, *CXX_FLAGS, f"-I{include}", os.path.join(csrc, "emulation", "harness.cpp"), "-o", partial]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the csrc emulation failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
        os.replace(partial, target)
    lib = ctypes.CDLL(target)
    lib.lk_emulation_error.restype = ctypes.c_char_p
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.lk_emulated_nf4_gemv.argtypes = [i32, i32, i32, ptr, i64, i64, i64, ctypes.POINTER(_NF4), ptr, ptr, i64, i64,
                                         ptr, ctypes.c_float, ptr, ptr, i32, i32, i32]
    lib.lk_emulated_nf4_dequantize_slab.argtypes = [i32, ctypes.POINTER(_NF4), ptr, i64, i64, i64, i64, i64]
    lib.lk_emulated_nf4_grad_input.argtypes = [i32, ptr, i64, i64, i64, ctypes.POINTER(_NF4), i64, ptr, ptr, i32]
    lib.lk_emulated_mma.argtypes = [i32, ptr, ptr, ptr]
    lib.lk_emulated_rule_probe.argtypes = [i32, ptr, ptr]
    lib.lk_emulation_set_schedule.argtypes = [ctypes.c_uint64]
    return lib


@contextlib.contextmanager
def schedule(order: int):
    """Within the block, the emulation resumes threads in ``order``: 0 ascending (the default), 1
    descending, any other value a shuffle seeded by it (per block). Results must not depend on it."""
    library().lk_emulation_set_schedule(order)
    try:
        yield
    finally:
        library().lk_emulation_set_schedule(0)


def available() -> Optional[str]:
    """None when the library can be built here, else why not."""
    try:
        _toolchain()
    except EmulationUnavailable as exc:
        return str(exc)
    return None


def _call(function, *args) -> None:
    if function(*args) != 0:
        raise RuntimeError(f"emulated kernel: {library().lk_emulation_error().decode()}")


# ----------------------------------------------------------------------------- guarded buffers

def _fill_value(dtype: torch.dtype):
    return float("nan") if dtype.is_floating_point else torch.iinfo(dtype).max


class _Guarded:
    """A copy of ``t`` (any strides; or an uninitialised [shape] output filled with NaN / max) placed
    between guard bands in one flat buffer, ``offset_bytes`` past an aligned start."""

    def __init__(self, t: Optional[torch.Tensor] = None, *, shape=None, dtype=None, offset_bytes: int = 0):
        dtype = t.dtype if t is not None else dtype
        size = tuple(t.shape) if t is not None else tuple(shape)
        strides = t.stride() if t is not None else torch.empty(shape, device="meta").stride()
        span = 1 + sum((n - 1) * s for n, s in zip(size, strides)) if all(size) else 0
        item = torch.empty((), dtype=dtype).element_size()
        if offset_bytes % item:
            raise ValueError(f"offset_bytes must be a multiple of {item}")
        self.guard = GUARD_BYTES // item
        self.start = self.guard + offset_bytes // item
        self.buffer = torch.full((self.start + span + self.guard,), _fill_value(dtype), dtype=dtype)
        self.view = self.buffer.as_strided(tuple(size), tuple(strides), self.start)
        if t is not None:
            self.view.copy_(t)
        self.span = span
        self._bands = self._guard_bands().clone()

    def _guard_bands(self):
        return torch.cat([self.buffer[:self.start], self.buffer[self.start + self.span:]])

    @property
    def ptr(self) -> int:
        return self.view.data_ptr()

    @property
    def nbytes(self) -> int:
        return self.span * self.buffer.element_size()

    def check_untouched(self, name: str) -> None:
        """The guard bands still hold their fill: nothing was written outside the tensor."""
        bands = self._guard_bands()
        same = bands.view(torch.uint8) == self._bands.view(torch.uint8)
        if not bool(same.all()):
            raise RuntimeError(f"emulated kernel wrote outside {name}")


def _nf4(wq: NF4Tensors, keep: list, packed_offset: int = 0) -> _NF4:
    """The harness' view of an NF4 weight, its tensors copied between guard bands (kept alive in ``keep``)."""
    def guarded(t, offset=0):
        if t is None:
            return None
        g = _Guarded(t.reshape(-1), offset_bytes=offset)
        keep.append(g)
        return g
    packed, absmax = guarded(wq.packed, packed_offset), guarded(wq.absmax)
    code2, scale2, offset, code = (guarded(wq.absmax_code), guarded(wq.absmax_scale),
                                   guarded(None if wq.absmax_offset is None else wq.absmax_offset.reshape(1)),
                                   guarded(wq.code))
    dq = wq.absmax_code is not None
    return _NF4(packed.ptr, packed.nbytes, absmax.ptr, absmax.nbytes,
                code2.ptr if dq else None, scale2.ptr if dq else None, scale2.span if dq else 0,
                offset.ptr if dq else None, code.ptr, wq.blocksize.bit_length() - 1,
                wq.nested_blocksize.bit_length() - 1 if dq else 0, DTYPE_CODES[wq.dtype], int(dq))


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


# ----------------------------------------------------------------------------- the ops

def nf4_gemv_lora(x, packed, absmax, absmax_code, absmax_scale, absmax_offset, code, lora_A, lora_B, bias, scale,
                  blocksize, nested_blocksize, weight_dtype, kernel=0, *, sms: int = 3,
                  shared_optin: int = H100_SHARED_OPTIN, packed_offset: int = 0, defer_lora: bool = False):
    """The op ``lora_kernels::nf4_gemv_lora`` (kernel 0 SIMT, 1 tensor cores) run by the emulation on
    CPU tensors: (y [M, N] in x's dtype, h [M, r] in the adapters' dtype). ``packed_offset``: bytes by
    which the codes' copy is moved off a 16-byte boundary (the SIMT kernel's element path);
    ``defer_lora``: the tensor-core kernel adds its LoRA term in a tail pass, as the CUDA launcher has
    it do after the shrink kernel on sm_90."""
    M, K = x.shape
    N, r = lora_B.shape
    wq = NF4Tensors(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, N, K, blocksize, nested_blocksize,
                    weight_dtype)
    if x.dim() != 2 or x.stride(1) != 1 or not 1 <= M <= GEMV_MAX_ROWS:
        raise ValueError(f"x must be [M, K] with unit stride along K and 1 <= M <= {GEMV_MAX_ROWS}, got "
                         f"{tuple(x.shape)} strides {x.stride()}")
    if x.dtype not in (torch.float16, torch.bfloat16) or lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"x must be float16 or bfloat16 and the adapters x's dtype or float32, got {x.dtype}, "
                        f"{lora_A.dtype}")
    if r > GEMV_MAX_RANK or not _power_of_two(blocksize) or blocksize < 32:
        raise ValueError(f"rank at most {GEMV_MAX_RANK} and a power-of-two blocksize >= 32, got r={r}, "
                         f"blocksize={blocksize}")
    if kernel == 1 and (shared_optin < MMA_SHARED_BYTES or x.stride(0) % 8 or not mma_weight_ok(wq)):
        raise ValueError("the tensor-core kernel needs K % 256 == 0, blocksize 64, nested_blocksize >= 4, aligned "
                         f"codes and absmax, rows of x 16-byte aligned and {MMA_SHARED_BYTES} bytes of shared memory")
    keep = []
    weight = _nf4(wq, keep, packed_offset)
    xg = _Guarded(x)
    A = _Guarded(lora_A.contiguous()) if r else None
    B = _Guarded(lora_B.contiguous()) if r else None
    b = _Guarded(bias.float().contiguous()) if bias is not None else None
    y = _Guarded(shape=(M, N), dtype=x.dtype)
    h = _Guarded(shape=(M, r), dtype=lora_A.dtype)
    _call(library().lk_emulated_nf4_gemv, kernel, DTYPE_CODES[x.dtype], DTYPE_CODES[lora_A.dtype], xg.ptr, M, K,
          x.stride(0), ctypes.byref(weight), A.ptr if A else None, B.ptr if B else None, N, r, b.ptr if b else None,
          float(scale), y.ptr, h.ptr, sms, shared_optin, int(defer_lora))
    y.check_untouched("y")
    h.check_untouched("h")
    return y.view.clone(), h.view.clone()


def nf4_dequantize_slab(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, N, K, n0, n1, k0, k1,
                        blocksize, nested_blocksize, weight_dtype, out_dtype):
    """The op ``lora_kernels::nf4_dequantize_slab`` run by the emulation: W[n0:n1, k0:k1] in out_dtype."""
    if K % 8 or k0 % 8 or (k1 - k0) % 8 or not (0 <= n0 <= n1 <= N and 0 <= k0 <= k1 <= K):
        raise ValueError(f"needs K, k0 and k1 - k0 multiples of 8 inside [{N}, {K}], got rows [{n0}, {n1}) "
                         f"columns [{k0}, {k1})")
    wq = NF4Tensors(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, N, K, blocksize, nested_blocksize,
                    weight_dtype)
    out = _Guarded(shape=(n1 - n0, k1 - k0), dtype=out_dtype)
    if out.span:
        keep = []
        _call(library().lk_emulated_nf4_dequantize_slab, DTYPE_CODES[out_dtype], ctypes.byref(_nf4(wq, keep)),
              out.ptr, K, n0, k0, n1 - n0, k1 - k0)
        out.check_untouched("out")
    return out.view.clone()


def nf4_grad_input(grad_y, packed, absmax, absmax_code, absmax_scale, absmax_offset, code, init, K, blocksize,
                   nested_blocksize, weight_dtype, *, sms: int = 3):
    """The op ``lora_kernels::nf4_grad_input`` run by the emulation: grad_y [M, N] @ W + init (fp32 [M, K]
    or None), in grad_y's dtype. ``sms`` sets the kernel's splits of N, as the device's SM count does."""
    M, N = grad_y.shape
    if grad_y.stride(1) != 1 or M > 64 or K % 8 or not _power_of_two(blocksize) or blocksize < 8:
        raise ValueError(f"needs grad_y [M <= 64, N] with unit stride along N, K % 8 == 0 and a power-of-two "
                         f"blocksize >= 8, got {tuple(grad_y.shape)} strides {grad_y.stride()}, K={K}, "
                         f"blocksize={blocksize}")
    if init is not None and (init.dtype != torch.float32 or tuple(init.shape) != (M, K)):
        raise ValueError(f"init must be float32 [{M}, {K}], got {init.dtype} {tuple(init.shape)}")
    if M == 0 or K == 0 or N == 0:  # as the op's entry point: nothing to launch
        return init.to(grad_y.dtype) if init is not None and M and K else grad_y.new_zeros((M, K))
    wq = NF4Tensors(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, N, K, blocksize, nested_blocksize,
                    weight_dtype)
    keep = []
    weight = _nf4(wq, keep)
    dy = _Guarded(grad_y)
    start = _Guarded(init.contiguous()) if init is not None else None
    dx = _Guarded(shape=(M, K), dtype=grad_y.dtype)
    _call(library().lk_emulated_nf4_grad_input, DTYPE_CODES[grad_y.dtype], dy.ptr, M, N, grad_y.stride(0),
          ctypes.byref(weight), K, start.ptr if start else None, dx.ptr, sms)
    dx.check_untouched("dx")
    return dx.view.clone()


# ----------------------------------------------------------------------------- checks of the emulation

def emulated_mma(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One mma.m16n8k16 of the emulation: a [16, 16] @ b [16, 8] with both rounded to ``dtype``
    (fp16 / bf16), fragments built by a one-warp kernel from the PTX ISA's layout; fp32 [16, 8]."""
    a32, b32 = a.float().contiguous(), b.float().contiguous()
    d = torch.full((16, 8), float("nan"))
    _call(library().lk_emulated_mma, int(dtype == torch.bfloat16), a32.data_ptr(), b32.data_ptr(), d.data_ptr())
    return d


RULE_PROBES = ("divergent barrier", "read before cp.async wait", "load past the input")


def rule_probe(name: str) -> Optional[str]:
    """Runs a kernel that breaks one of the emulation's rules (``RULE_PROBES``); the error it reports."""
    inp, out = torch.randn(64), torch.zeros(64)
    try:
        _call(library().lk_emulated_rule_probe, RULE_PROBES.index(name), inp.data_ptr(), out.data_ptr())
    except RuntimeError as exc:
        return str(exc)
    return None
