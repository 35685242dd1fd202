"""Shared helpers of the correctness tests: error metric and bounds, input factory, float64
reference, poisoned memory, and backend selection with a record of which implementation ran.

Every numerical check is the relative error ||out - ref|| / ||ref|| against a float64 reference
computed from the same inputs upcast to float64.
"""
import contextlib
import copy
import dataclasses
import functools
import importlib.util
import math
import os
from typing import Callable, Optional
from unittest import mock

import pytest
import torch
import triton

import lora_kernels
import lora_kernels.ops.lora_linear as ops_impl
import lora_kernels.ops.nf4_lora_linear as nf4_ops_impl
from lora_kernels.kernels import major_minor
from lora_kernels.ops import CPU_BACKEND_ENV, dropout_keep_mask, lora_linear_reference
from lora_kernels.ops.lora_linear import DENSE_TORCH_MAX_M_ENV
from lora_kernels.ops.nf4_gemv import NF4_GEMV_ENV
from lora_kernels.ops.triton_launch import is_interpreted

# Relative-error bounds per dtype of x (forward output and every gradient). Measured: fp32 ~1e-7,
# fp16 ~3e-4, bf16 ~5e-3..1e-2 under the interpreter. The bf16 bound is loose because the Triton
# interpreter converts fp32 -> bf16 by truncation instead of round-to-nearest, which biases every
# stored bf16 value (outputs and h) by up to one ulp (2**-8 relative).
BOUNDS = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SEED_HIGH = 2**62

# The TMA kernels under the interpreter: triton 3.4's and 3.5's assert a descriptor's strides in
# elements where the hardware's rule is bytes (a bf16 row of 24 elements fails there, as it does not
# on a GPU); 3.6 and 3.9 interpret them.
needs_interpreter_with_tma = pytest.mark.skipif(
    is_interpreted() and major_minor(triton.__version__) < (3, 6),
    reason="triton < 3.6's interpreter checks TMA descriptor strides in elements, not bytes")


def bound_for(*dtypes) -> float:
    """The loosest bound of the dtypes involved (the output precision limits every check)."""
    return max(BOUNDS[d] for d in dtypes if d is not None)


# Rounding error of a sum is proportional to the sum of |terms| (the same computation on absolute
# values), not to the result: a result that cancels to a small fraction of that is ill-conditioned and
# its plain relative error measures the cancellation, not the kernel. Checks that pass ``magnitude``
# use max(||ref||, ||magnitude|| / 8) as the denominator. For random data with K >= 2 terms
# ||ref|| / ||magnitude|| is about 1 / (0.64 sqrt(K)) > 1/8 up to K ~ 150, so only the cancelled
# draws (tiny K and N, which hypothesis likes) are affected.
CANCELLATION_FLOOR = 1.0 / 8


def rel_err(out: torch.Tensor, ref: torch.Tensor, magnitude: Optional[torch.Tensor] = None) -> float:
    """||out - ref|| / ||ref|| in float64. A zero (or empty) reference demands an exact zero:
    then the absolute norm ||out|| is returned. NaN anywhere gives NaN (which fails ``< bound``).
    magnitude: optional reference computed on |inputs|; see CANCELLATION_FLOOR."""
    assert tuple(out.shape) == tuple(ref.shape), f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out64 = out.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    diff = (out64 - ref64).norm().item()
    ref_norm = ref64.norm().item()
    if magnitude is not None:
        ref_norm = max(ref_norm, CANCELLATION_FLOOR * magnitude.detach().to("cpu", torch.float64).norm().item())
    if out64.isnan().any():
        return math.nan
    return diff / ref_norm if ref_norm > 0 else diff


def assert_close(out: torch.Tensor, ref: torch.Tensor, bound: float, name: str = "",
                 magnitude: Optional[torch.Tensor] = None) -> None:
    err = rel_err(out, ref, magnitude)
    assert err < bound, f"{name}: relative error {err:.3g} not below {bound:g}"


# ---------------------------------------------------------------------------------------------
# Poisoned memory: with deterministic algorithms and fill_uninitialized_memory, torch.empty
# returns NaN-filled float memory (int: max value), so an element a kernel forgets to write shows
# up as NaN in the output and fails every relative-error check.
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def poisoned_memory():
    import torch.utils.deterministic as det
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        det.fill_uninitialized_memory = prev[2]


# ---------------------------------------------------------------------------------------------
# Backends. "triton": CPU tensors through the Triton interpreter; "torch": the lean PyTorch path;
# "cuda": CUDA tensors (Triton compiled), only where a GPU exists.
# ---------------------------------------------------------------------------------------------
# CPU tensors: Triton interpreter, lean torch path; CUDA tensors where a GPU exists (lent GPU machines
# run the whole suite that way).
BACKENDS = ("triton", "torch") + (("cuda",) if torch.cuda.is_available() else ())
# Device of the backend ``use_backend`` selected (None outside it: CPU). Tests written once for every
# backend build their tensors with the helpers below without naming a device; the "cuda" case must
# then get CUDA tensors, or it silently runs the CPU path (and fails its check of which impl ran).
_ACTIVE_DEVICE: Optional[torch.device] = None


def default_device() -> torch.device:
    """Where the helpers put tensors when no device is given: the device of the backend selected by
    ``use_backend`` (CUDA for "cuda"), else the CPU."""
    return _ACTIVE_DEVICE if _ACTIVE_DEVICE is not None else torch.device("cpu")


@dataclasses.dataclass
class BackendRecord:
    name: str
    device: torch.device
    calls: list  # (impl "triton"/"torch", "fwd"/"bwd", positional args of the impl)

    def impls(self, kind: Optional[str] = None) -> list:
        return [c[0] for c in self.calls if kind is None or c[1] == kind]

    @property
    def impl(self) -> str:
        """The implementation this backend runs on non-empty problems: "torch" or "triton" (also for
        "cuda", whose calls are recorded as "triton")."""
        return "torch" if self.name == "torch" else "triton"

    def expected_impl(self, M: int, N: int, K: int, r: int) -> str:
        if M == 0 or N == 0 or K == 0 or r > lora_kernels.kernels.configs.MAX_RANK:
            return "torch"
        return self.impl

    def clear(self) -> None:
        self.calls.clear()


def backend_available(name: str) -> Optional[str]:
    """None if ``name`` can run here, else the reason to skip."""
    if name == "triton" and not is_interpreted():
        return "CPU Triton backend needs TRITON_INTERPRET=1 (set by tests/conftest.py without a GPU)"
    if name == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    return None


@contextlib.contextmanager
def use_backend(name: str):
    """Select the backend (env LORA_KERNELS_CPU_BACKEND is read per call; tensors the helpers make
    without a device go to the backend's device, see ``default_device``) and record every call of the
    four implementations, so tests can assert which one actually ran."""
    global _ACTIVE_DEVICE
    reason = backend_available(name)
    if reason:
        pytest.skip(reason)
    record = BackendRecord(name, torch.device("cuda" if name == "cuda" else "cpu"), [])

    def spy(impl_name, kind, fn):
        def wrapper(*args, **kwargs):
            record.calls.append((impl_name, kind, args))
            return fn(*args, **kwargs)
        return wrapper

    pinned = {CPU_BACKEND_ENV: "torch" if name == "torch" else ("triton" if name == "triton" else "auto"),
              # "cuda" is the Triton kernels on CUDA at every M: the small-M PyTorch route of dense calls
              # (ops.lora_linear.select_backend) and the CUDA NF4 GEMV of small-M NF4 forwards
              # (ops.nf4_gemv.use_cuda_gemv, on by default up to 32 rows) have tests of their own
              DENSE_TORCH_MAX_M_ENV: "0", NF4_GEMV_ENV: "0"}
    old_env, old_device = {variable: os.environ.get(variable) for variable in pinned}, _ACTIVE_DEVICE
    os.environ.update(pinned)
    _ACTIVE_DEVICE = record.device
    # The dense and the NF4 custom ops call the same four implementations.
    patches = [mock.patch.object(module, attr, spy(impl, kind, getattr(module, attr)))
               for module in (ops_impl, nf4_ops_impl)
               for attr, impl, kind in (("triton_lora_forward", "triton", "fwd"),
                                        ("torch_lora_forward", "torch", "fwd"),
                                        ("triton_lora_backward", "triton", "bwd"),
                                        ("torch_lora_backward", "torch", "bwd"))]
    try:
        with contextlib.ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            yield record
    finally:
        _ACTIVE_DEVICE = old_device
        for variable, old in old_env.items():
            if old is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = old


# Backward impl positional arguments (see ops.lora_linear.lora_linear_bwd).
BWD_NEED_FLAGS = slice(9, 13)  # need_x, need_A, need_B, need_bias


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
LAYOUTS = ("contiguous", "transposed", "sliced", "row_strided")


def make_x(lead: tuple, K: int, dtype, layout: str, gen: torch.Generator, device="cpu"):
    """(leaf, view_fn): view_fn(leaf) is x of shape [*lead, K] with the requested memory layout.
    Gradients land on the leaf; the float64 reference applies the same view_fn to leaf.double()."""
    lead = tuple(lead)
    if layout == "contiguous":
        leaf = torch.randn(*lead, K, generator=gen)
        fn = lambda t: t  # noqa: E731
    elif layout == "transposed":  # last two dims swapped: stride 1 along the leading dim
        if len(lead) == 0:
            leaf = torch.randn(K, generator=gen)
            fn = lambda t: t  # noqa: E731
        else:
            leaf = torch.randn(*lead[:-1], K, lead[-1], generator=gen)
            fn = lambda t: t.transpose(-1, -2)  # noqa: E731
    elif layout == "sliced":  # every other column, storage offset 1
        leaf = torch.randn(*lead, 2 * K + 1, generator=gen)
        fn = lambda t: t[..., 1::2]  # noqa: E731
    elif layout == "row_strided":  # every other row of the first dim
        if len(lead) == 0:
            leaf = torch.randn(K, generator=gen)
            fn = lambda t: t  # noqa: E731
        else:
            leaf = torch.randn(2 * lead[0], *lead[1:], K, generator=gen)
            fn = lambda t: t[::2]  # noqa: E731
    else:
        raise ValueError(layout)
    leaf = leaf.to(device=device, dtype=dtype)
    assert tuple(fn(leaf).shape) == (*lead, K)
    return leaf, fn


@dataclasses.dataclass
class Problem:
    x_leaf: torch.Tensor
    view: Callable
    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    bias: Optional[torch.Tensor]
    lora_B_bias: Optional[torch.Tensor]
    scale: float
    # NF4 problems: the quantized weight the layer runs on; ``weight`` is then its value as
    # bitsandbytes decodes it (``bnb_dequantized``), in x's dtype, which the float64 reference uses.
    qweight: Optional[object] = None

    @property
    def x(self) -> torch.Tensor:
        return self.view(self.x_leaf)

    @property
    def M(self) -> int:
        return math.prod(self.x.shape[:-1])

    def params(self) -> dict:
        """The differentiable leaves by argument name (those that require grad)."""
        named = {"x": self.x_leaf, "lora_A": self.lora_A, "lora_B": self.lora_B, "bias": self.bias,
                 "lora_B_bias": self.lora_B_bias}
        return {k: v for k, v in named.items() if v is not None and v.requires_grad}

    def zero_grad(self) -> None:
        for t in self.params().values():
            t.grad = None


def make_problem(lead, K, N, r, x_dtype=torch.float32, adapter_dtype=None, *, bias=False,
                 lora_B_bias=False, bias_dtype=None, layout="contiguous", seed=0, scale=None,
                 device=None, requires_grad=("x", "lora_A", "lora_B", "bias", "lora_B_bias"),
                 nf4: Optional[dict] = None) -> Problem:
    """Random inputs (never zeros; lora_B random, not PEFT's zero init), scaled so the base and
    LoRA terms are of similar magnitude; on ``device`` (default: ``default_device()``), drawn on
    the CPU so every device gets the same values.

    nf4: None for a dense weight, else NF4Weight.quantize's options plus optional "weight_dtype" (the stored dtype, default x's): the problem then
    runs ``nf4_lora_linear``, and ``weight`` is the quantized weight as bitsandbytes decodes it."""
    device = default_device() if device is None else device
    adapter_dtype = adapter_dtype or x_dtype
    bias_dtype = bias_dtype or x_dtype
    gen = torch.Generator().manual_seed(seed)
    leaf, fn = make_x(lead, K, x_dtype, layout, gen, device)
    kw = {"device": device}
    weight = (torch.randn(N, K, generator=gen) / math.sqrt(max(K, 1))).to(dtype=x_dtype, **kw)
    lora_A = (torch.randn(r, K, generator=gen) / math.sqrt(max(K, 1))).to(dtype=adapter_dtype, **kw)
    lora_B = (torch.randn(N, r, generator=gen) / math.sqrt(max(r, 1))).to(dtype=adapter_dtype, **kw)
    b = torch.randn(N, generator=gen).to(dtype=bias_dtype, **kw) if bias else None
    lbb = torch.randn(N, generator=gen).to(dtype=adapter_dtype, **kw) if lora_B_bias else None
    if scale is None:
        scale = float(0.5 + torch.rand((), generator=gen))
    named = {"x": leaf, "lora_A": lora_A, "lora_B": lora_B, "bias": b, "lora_B_bias": lbb}
    for name in requires_grad:
        if named[name] is not None:
            named[name].requires_grad_(True)
    qweight = None
    if nf4 is not None:
        options = dict(nf4)
        qweight = lora_kernels.NF4Weight.quantize(weight.to(options.pop("weight_dtype", x_dtype)), **options)
        # bitsandbytes' decode, not NF4Weight.dequantize(): on CUDA that is the Triton decode under test.
        # Decoded on the CPU, whose bnb kernels take any nested block size (NF4Weight.quantize makes some that
        # quantize_4bit never does, and bnb's CUDA kernels are not tested with them).
        weight = bnb_dequantized(qweight.to("cpu")).to(device=device, dtype=x_dtype)
    return Problem(leaf, fn, weight, lora_A, lora_B, b, lbb, scale, qweight)


def make_grad_y(problem: Problem, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (*problem.x.shape[:-1], problem.weight.shape[0])
    return torch.randn(shape, generator=gen).to(device=problem.x_leaf.device, dtype=problem.x_leaf.dtype)


def run_public(problem: Problem, grad_y: Optional[torch.Tensor], **kwargs):
    """y and the gradients of every leaf that requires grad (None grad stays None)."""
    problem.zero_grad()
    if problem.qweight is not None:
        y = lora_kernels.nf4_lora_linear(problem.x, problem.qweight, problem.lora_A, problem.lora_B,
                                         problem.scale, bias=problem.bias, lora_B_bias=problem.lora_B_bias,
                                         **kwargs)
    else:
        y = lora_kernels.lora_linear(problem.x, problem.weight, problem.lora_A, problem.lora_B, problem.scale,
                                     bias=problem.bias, lora_B_bias=problem.lora_B_bias, **kwargs)
    grads = {}
    if grad_y is not None and y.requires_grad:
        y.backward(grad_y)
        grads = {k: v.grad for k, v in problem.params().items()}
    return y, grads


def reference(problem: Problem, grad_y: Optional[torch.Tensor], keep_mask=None, dropout_p=0.0,
              absolute: bool = False):
    """float64 y and gradients (by argument name) from the same inputs upcast to float64.
    keep_mask: bool [M, K] over the flattened rows of x, or None.
    absolute: compute on |inputs| and |grad_y| (the magnitudes for CANCELLATION_FLOOR)."""
    def up(t):
        if t is None:
            return None
        t64 = t.detach().to("cpu", torch.float64)
        return (t64.abs() if absolute else t64).requires_grad_(t.requires_grad)

    leaf = up(problem.x_leaf)
    x = problem.view(leaf)
    A, B, bias, lbb = (up(t) for t in (problem.lora_A, problem.lora_B, problem.bias, problem.lora_B_bias))
    keep = None if keep_mask is None else keep_mask.to("cpu").reshape(x.shape)
    y = lora_linear_reference(x, up(problem.weight).detach(), A, B, problem.scale, bias=bias,
                              lora_B_bias=lbb, keep_mask=keep, dropout_p=dropout_p)
    grads = {}
    if grad_y is not None and y.requires_grad:
        g64 = grad_y.to("cpu", torch.float64)
        y.backward(g64.abs() if absolute else g64)
        named = {"x": leaf, "lora_A": A, "lora_B": B, "bias": bias, "lora_B_bias": lbb}
        grads = {k: v.grad for k, v in named.items() if v is not None and v.requires_grad}
    return y.detach(), grads


def seed_after_manual_seed(s: int, device=None) -> torch.Tensor:
    """The dropout seed lora_linear draws right after torch.manual_seed(s) for x on ``device``
    (default ``default_device()``): it draws from that device's generator."""
    torch.manual_seed(s)
    device = default_device() if device is None else device
    return torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64, device=device)


def keep_mask_for(s: int, M: int, K: int, p: float, device=None) -> torch.Tensor:
    return dropout_keep_mask(seed_after_manual_seed(s, device), M, K, p)


def rng_state(device=None) -> torch.Tensor:
    """State of torch's generator for ``device`` (default ``default_device()``), the one a dropout
    seed for x on that device is drawn from."""
    device = torch.device(default_device() if device is None else device)
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def check_against_reference(problem: Problem, y, grads, ref_y, ref_grads, bound: float,
                            magnitudes: Optional[tuple] = None) -> None:
    """Output dtype/shape, every gradient's dtype/shape, and relative errors of all of them.
    magnitudes: optional (y, grads) from ``reference(..., absolute=True)``; see CANCELLATION_FLOOR."""
    mag_y, mag_grads = magnitudes if magnitudes is not None else (None, {})
    assert y.dtype == problem.x_leaf.dtype
    assert tuple(y.shape) == (*problem.x.shape[:-1], problem.weight.shape[0])
    assert_close(y, ref_y, bound, "y", mag_y)
    assert set(grads) == set(ref_grads), (set(grads), set(ref_grads))
    params = problem.params()
    for name, ref_g in ref_grads.items():
        g = grads[name]
        assert g is not None, f"{name}.grad is None"
        assert g.dtype == params[name].dtype, f"{name}.grad dtype {g.dtype} != {params[name].dtype}"
        assert_close(g, ref_g, bound, f"d{name}", mag_grads.get(name))


class GridRecorder:
    """Stands in for a @triton.jit kernel (``monkeypatch.setattr(triton_launch, name, ...)``): records
    each launch grid, then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


# ---------------------------------------------------------------------------------------------
# The NF4 decode GEMV and slab decode ops (lora_kernels/ops/nf4_gemv.py): inputs and references,
# shared by the op's tests (tests/ops/test_nf4_gemv.py) and the emulated kernels' (tests/csrc/).
# ---------------------------------------------------------------------------------------------
def nf4_gemv_inputs(M, K, N, r, dtype, adapter_dtype, bias, double_quant=True, device="cpu", seed=0, weight_dtype=None,
                    quant_type="nf4", blocksize=64, nested_blocksize=None):
    """(args of the op lora_kernels::nf4_gemv_lora without ``kernel``, the NF4Weight): random x [M, K],
    weight [N, K] stored in ``weight_dtype`` (default x's) and quantized (NF4 or FP4; block sizes as
    ``NF4Weight.quantize``), adapters, fp32 bias or None."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(weight_dtype or dtype)  # the stored (decoded) dtype
    q = lora_kernels.NF4Weight.quantize(w, blocksize, double_quant, quant_type, nested_blocksize)
    q = q.to(device)
    x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype)
    A = (torch.randn(r, K, generator=g) / math.sqrt(K)).to(device=device, dtype=adapter_dtype)
    B = (torch.randn(N, r, generator=g) / math.sqrt(r)).to(device=device, dtype=adapter_dtype)
    b = torch.randn(N, generator=g).to(device=device, dtype=torch.float32) if bias else None
    args = (x, *q.op_tensors(), A, B, b, 0.75, q.blocksize, q.nested_blocksize, q.dtype)
    return args, q


def bnb_dequantize(packed, quant_state):
    """bnb's dequantize_4bit, reshaped to the weight's shape.

    bnb 0.50.2's AVX512 CPU kernel (cdequantize_blockwise_cpu_nf4_*) looks the scale up per row, as
    absmax[row * (K // blocksize) + k // blocksize]; that is wrong when blocks span rows, i.e. when K
    is a multiple of 16 (its vector path) but not of the block size: it returns wrong values there
    (its own torch kernel, and ours, are right). For those shapes the same bytes are decoded as one
    row, where bnb's indexing is exact. The same is done for weights of more than 2 dimensions and
    at most 2 elements, which crash bnb's transpose shim for packed tensors of one row. bnb's
    fallback kernel is torch.compile'd; eager mode keeps this fast.
    """
    shape = tuple(quant_state.shape)
    row_bug = len(shape) >= 2 and shape[-1] % 16 == 0 and shape[-1] % quant_state.blocksize
    if row_bug or (len(shape) > 2 and packed.shape[0] == 1):
        quant_state = copy.copy(quant_state)
        quant_state.shape = torch.Size([math.prod(shape)])
    with torch.compiler.set_stance("force_eager"):
        out = pytest.importorskip("bitsandbytes.functional").dequantize_4bit(packed, quant_state)
    return out.reshape(shape)  # bnb returns 1-D and tiny weights transposed or as [1, n]


def float_bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor (fp32 as int32, 16-bit floats as int16): bit-exact comparisons
    that tell -0.0 from +0.0 and compare NaN payloads."""
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


@functools.lru_cache(maxsize=None)
def bnb_cpu_decodes_fp4_negative_zero() -> bool:
    """Whether bitsandbytes' CPU dequantize_4bit decodes FP4 code 8 (sign bit set, magnitude 0) as -0.0
    on this machine, as its CUDA kernel does (sign * table[0]) and lora_kernels does everywhere. It
    depends on the CPU: bnb 0.50.2's native code gives -0.0 on some (the CPU CI's until 2026-12-01) and
    +0.0 on others (AMD EPYC with AVX512-BF16), as its torch fallback does, which reads its quant_map."""
    F = pytest.importorskip("bitsandbytes.functional")
    _, state = F.quantize_4bit(torch.ones(1, 64), blocksize=64, quant_type="fp4", compress_statistics=False)
    packed = torch.full((32, 1), 0x88, dtype=torch.uint8)  # 64 values of code 8
    return bool(torch.signbit(F.dequantize_4bit(packed, state)).all())


def assert_same_fp4_decode_as_bnb(ours: torch.Tensor, theirs: torch.Tensor, bnb_native: bool = True):
    """``ours`` equals bitsandbytes' FP4 decode ``theirs`` bit for bit, but for the sign of zeros where
    bnb's CPU decode gives +0.0 for code 8 (``bnb_cpu_decodes_fp4_negative_zero``; not ``bnb_native``: its
    torch fallback, which always does): there the values differ only in zeros' signs."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    differ = float_bits(ours) != float_bits(theirs)
    if bnb_native and bnb_cpu_decodes_fp4_negative_zero():
        assert not bool(differ.any())
    else:
        assert bool((ours[differ] == 0).all()) and bool((theirs[differ] == 0).all())


def bnb_dequantized(q):
    """The weight as bitsandbytes decodes it (its own dequantize_4bit when installed, through
    ``bnb_dequantize``; else ours, which tests/ops/test_nf4_format.py proves bit-exact with it)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return q.dequantize()
    from lora_kernels.integrations.bitsandbytes import nf4_to_bnb
    params, state = nf4_to_bnb(q)
    return bnb_dequantize(params.data, state)


def nf4_gemv_reference(args, q):
    """float64 (y, h) of the op's arguments, on the weight as bitsandbytes decodes it."""
    x, A, B, b, scale = args[0], args[7], args[8], args[9], args[10]
    W = bnb_dequantized(q).to(x.dtype).double().cpu()  # bnb: decode to the stored dtype, then x's dtype
    h = x.double().cpu() @ A.double().cpu().t()
    y = x.double().cpu() @ W.t() + scale * (h @ B.double().cpu().t())
    return (y + b.double().cpu() if b is not None else y), h


def nf4_slab_args(q, n0, n1, k0, k1, dtype):
    """The arguments of the op lora_kernels::nf4_dequantize_slab for W[n0:n1, k0:k1] of ``q`` in ``dtype``."""
    N, K = q.shape
    return (*q.op_tensors(), N, K, n0, n1, k0, k1, q.blocksize, q.nested_blocksize, q.dtype, dtype)


def nf4_grad_input_args(M, N, K, dtype, init, double_quant=True, weight_dtype=None, seed=0, blocksize=64,
                        nested_blocksize=None):
    """(args of the op lora_kernels::nf4_grad_input, the NF4Weight): random grad_y [M, N] in ``dtype``,
    weight [N, K] stored in ``weight_dtype`` (default dtype; block sizes as ``NF4Weight.quantize``), fp32 init
    [M, K] when ``init``."""
    g = torch.Generator().manual_seed(seed)
    q = lora_kernels.NF4Weight.quantize((torch.randn(N, K, generator=g) / math.sqrt(K)).to(weight_dtype or dtype),
                                        blocksize, double_quant, nested_blocksize=nested_blocksize)
    grad_y = torch.randn(M, N, generator=g).to(dtype)
    start = torch.randn(M, K, generator=g) if init else None
    return (grad_y, *q.op_tensors(), start, K, q.blocksize, q.nested_blocksize, q.dtype), q


def nf4_grad_input_reference(args, q):
    """float64 dx of the op's arguments, on the weight as bitsandbytes decodes it (in grad_y's dtype)."""
    grad_y, init = args[0], args[7]
    dx = grad_y.double() @ bnb_dequantized(q).to(grad_y.dtype).double()
    return dx + init.double() if init is not None else dx


def nf4_weights_of_each_stored_dtype(N, K, double_quant, seed=5, quant_type="nf4"):
    """(stored dtype, NF4Weight) for the same random [N, K] values stored in bf16, fp16 and fp32: the
    slab decodes' bit-exactness cases (each rounds to the stored dtype, then to the output's)."""
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    for weight_dtype in (torch.bfloat16, torch.float16, torch.float32):
        yield weight_dtype, lora_kernels.NF4Weight.quantize(w.to(weight_dtype), double_quant=double_quant,
                                                            quant_type=quant_type)
