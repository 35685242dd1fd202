"""DoRA (Liu et al. 2024, weight-decomposed LoRA) on the fused kernels: ``dora_linear``.

    y = (x - d(x)) W^T + g * (d(x) W^T + scale d(x) A^T B^T) + bias,   g = magnitude / ||W + scale B A||_row

with d the (inverted) dropout and the row norm detached from autograd, as in the paper (section 4.3)
and in PEFT. Without dropout this is g * (the fused LoRA output) + bias: one fused GEMM and a
per-column scale; with dropout a second base GEMM on x - d(x), as PEFT runs one on d(x).

The row norms never form the [N, K] matrix W + scale B A (PEFT builds it in every forward):

    ||W_n + scale (B A)_n||^2 = ||W_n||^2 + 2 scale <B_n, (W A^T)_n> + scale^2 B_n (A A^T) B_n^T

||W_n||^2 belongs to the frozen base weight (computed a row chunk at a time, cacheable); W A^T is one
thin GEMM [N, r] per call (for an NF4 weight, the fused NF4 GEMM: nothing decodes the whole weight).
"""
import weakref
from typing import Optional

import torch

from lora_kernels.autograd.dropout import seeded_dropout
from lora_kernels.autograd.lora_linear import lora_linear
from lora_kernels.autograd.nf4_lora_linear import nf4_lora_linear
from lora_kernels.ops.checks import check_dropout_p
from lora_kernels.ops.nf4 import NF4Tensors, NF4Weight, tensor_version
from lora_kernels.ops.reference import nf4_row_chunks, nf4_rows

_SQNORM_CHUNK_ELEMENTS = 1 << 22  # elements of a dense W converted to fp32 at a time for ||W_n||^2


def base_matmul(x: torch.Tensor, weight) -> torch.Tensor:
    """x W^T [..., N] for a dense [N, K] weight (F.linear) or an NF4Weight (the fused NF4 GEMM with a
    rank-1 zero LoRA term: the weight is decoded tile by tile, never whole)."""
    if not isinstance(weight, NF4Weight):
        return torch.nn.functional.linear(x, weight)
    N, K = weight.shape
    zero_A = torch.zeros(1, K, dtype=torch.float32, device=x.device)
    zero_B = torch.zeros(N, 1, dtype=torch.float32, device=x.device)
    return nf4_lora_linear(x, weight, zero_A, zero_B, 0.0, training=False)


def tensor_cache_key(tensor: torch.Tensor) -> tuple:
    """The key of a cache of something computed from a tensor's values: its storage (a
    weak reference: a new tensor allocated where a freed one was, as after model.half().float(), is
    another storage object), the place in it, and the version counter (in-place writes through the
    tensor or its views; not a write through ``tensor.data``, which has a counter of its own). An
    inference tensor (made under torch.inference_mode) has no version counter: its in-place writes
    are not seen either."""
    return (_StorageRef(tensor.untyped_storage()), tensor.storage_offset(), tensor_version(tensor))


def _weight_key(weight) -> tuple:
    tensor = weight.packed if isinstance(weight, NF4Weight) else weight
    layout = (id(weight),) if isinstance(weight, NF4Weight) else (weight.dtype, tuple(weight.shape), weight.stride())
    return (*tensor_cache_key(tensor), *layout)


class _StorageRef(weakref.ref):
    """A weak reference to a storage that compares equal to another only while both reach the same
    live storage object (torch keeps one Python object per storage)."""

    def __eq__(self, other):
        if not isinstance(other, _StorageRef):
            return NotImplemented
        target = self()
        return target is not None and target is other()

    __hash__ = weakref.ref.__hash__

    def __reduce__(self):
        # A copied or pickled cache (deepcopy, torch.save of a model) belongs to other storages: its
        # key must match none, as a reference to a storage that is gone.
        return _dead_storage_ref, ()


def _dead_storage_ref() -> _StorageRef:
    return _StorageRef(torch.UntypedStorage(0))  # the storage dies with this call


def row_sqnorm(weight, cache: Optional[dict] = None) -> torch.Tensor:
    """||W_n||^2 in fp32 [N] for a dense [N, K] weight or an NF4Weight (decoded like bitsandbytes:
    rounded to its stored dtype), a row chunk at a time: no fp32 or decoded copy of the whole weight.

    cache: a dict kept by the caller (e.g. in the layer that owns W): the value is reused while the
    weight's storage object, offset and version counter are the same (a frozen weight: computed once).
    A write through ``weight.data`` (a tensor with its own version counter), or to an inference
    tensor, is not seen: clear the dict after one. Not used while torch.compile traces (storages and
    versions are not traceable: the graph computes it). One entry per device, {device: (key, value)}, read in one lookup:
    nn.DataParallel's replicas share their module's dict and run in threads, one per GPU; a key
    checked and then a value read could be another replica's, on its GPU."""
    if torch.compiler.is_compiling():
        cache = None
    key = _weight_key(weight) if cache is not None else None
    entry = cache.get(weight.device) if cache is not None else None
    if entry is not None and entry[0] == key:
        return entry[1]
    N, K = weight.shape
    out = torch.empty(N, dtype=torch.float32, device=weight.device)
    if isinstance(weight, NF4Weight):  # the CPU path's row chunks, decoded like bnb, then fp32
        wq = NF4Tensors.of(weight)
        for n0, n1 in nf4_row_chunks(wq):
            out[n0:n1] = nf4_rows(wq, n0, n1, torch.float32).square().sum(1)
        return _store(cache, key, out)
    rows = max(1, _SQNORM_CHUNK_ELEMENTS // max(K, 1))
    for n0 in range(0, N, rows):
        out[n0:n0 + rows] = weight[n0:n0 + rows].float().square().sum(1)
    return _store(cache, key, out)


def _store(cache: Optional[dict], key, value: torch.Tensor) -> torch.Tensor:
    if cache is not None:
        # entries of weights that are gone (a model moved to another device, a replica's copy) free their value
        for device, (old_key, _) in list(cache.items()):
            if old_key[0]() is None:
                cache.pop(device, None)
        cache[value.device] = (key, value)
    return value


def dora_weight_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                     cache: Optional[dict] = None) -> torch.Tensor:
    """DoRA's ||W + scale B A||_row, fp32 [N], from ||W_n||^2 (``row_sqnorm``, cached in ``cache``),
    W A^T [N, r] and A A^T [r, r]; never the [N, K] sum. weight: dense [N, K] or an NF4Weight;
    lora_A [r, K], lora_B [N, r]. Not differentiable (DoRA detaches the norm)."""
    A, B = lora_A.detach().float(), lora_B.detach().float()
    if isinstance(weight, NF4Weight):
        wa = base_matmul(A, weight).t()  # [N, r] = W A^T, fp32
    else:
        wa = torch.mm(weight.detach(), A.t().to(weight.dtype)).float()
    sq = row_sqnorm(weight, cache) + 2 * scale * (B * wa).sum(1) + scale * scale * ((B @ (A @ A.t())) * B).sum(1)
    return sq.clamp_min(0).sqrt()


def dora_linear(x, weight, lora_A, lora_B, magnitude, scale, *, bias=None, dropout_p=0.0, training=True,
                out_dtype: Optional[torch.dtype] = None, norm_cache: Optional[dict] = None):
    """DoRA linear (see the module docstring), PEFT's ``use_dora=True`` semantics.

    Args:
        x: [..., K]; weight: frozen base weight, dense [N, K] (x's dtype) or an NF4Weight [N, K];
        lora_A [r, K], lora_B [N, r], scale as for ``lora_linear`` / ``nf4_lora_linear``;
        magnitude: [N] floating, DoRA's trainable magnitude vector (gets a gradient);
        bias: [N] or None; dropout_p in [0, 1), applied when ``training`` (the mask regenerated from
        its seed in backward: ``seeded_dropout``).
        out_dtype: the output's dtype (default: the fused layer's, x's or autocast's dtype).
        norm_cache: a dict the caller keeps per base weight for ||W_n||^2 (``row_sqnorm``).
    Returns:
        y [..., N].
    """
    if not isinstance(weight, (torch.Tensor, NF4Weight)):
        raise TypeError(f"weight must be a torch.Tensor or an NF4Weight [N, K], got {type(weight).__name__}")
    if len(weight.shape) != 2:
        raise ValueError(f"weight must have shape [N, K], got {list(weight.shape)}")
    if not isinstance(magnitude, torch.Tensor) or not magnitude.is_floating_point():
        raise TypeError(f"magnitude must be a floating-point torch.Tensor, got "
                        f"{getattr(magnitude, 'dtype', type(magnitude).__name__)}")
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be None or a floating-point torch.dtype, got {out_dtype!r}")
    if norm_cache is not None and not isinstance(norm_cache, dict):
        raise TypeError(f"norm_cache must be None or a dict, got {type(norm_cache).__name__}")
    N = weight.shape[0]
    if tuple(magnitude.shape) != (N,):
        raise ValueError(f"magnitude must have shape [{N}] (one value per output row), got {list(magnitude.shape)}")
    if isinstance(x, torch.Tensor) and magnitude.device != x.device:
        raise ValueError(f"magnitude must be on x's device {x.device}, got {magnitude.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point torch.Tensor or None, got "
                            f"{getattr(bias, 'dtype', type(bias).__name__)}")
        if tuple(bias.shape) != (N,) or bias.device != magnitude.device:
            raise ValueError(f"bias must have shape [{N}] on {magnitude.device}, got {list(bias.shape)} on {bias.device}")
    dropout_p = check_dropout_p("dropout_p", dropout_p)
    fused = nf4_lora_linear if isinstance(weight, NF4Weight) else lora_linear
    x_lora = seeded_dropout(x, dropout_p, training) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
    z = fused(x_lora, weight, lora_A, lora_B, scale)  # checks x, weight, the adapters and scale
    with torch.no_grad():  # DoRA paper 4.3 (and PEFT): the norm is a constant for autograd
        norm = dora_weight_norm(weight, lora_A, lora_B, float(scale), norm_cache)
    y = z * (magnitude / norm)
    if x_lora is not x:  # the base term of the dropped-out elements: (x - d(x)) W^T
        y = y + base_matmul(x - x_lora, weight)
    if bias is not None:
        y = y + bias
    return y.to(z.dtype if out_dtype is None else out_dtype)
