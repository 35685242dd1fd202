"""``LoRALinear`` and ``NF4LoRALinear``: swap-in LoRA / QLoRA layers for users without PEFT.

Both follow PEFT ``lora.Linear`` semantics (``y = x W^T + b + scale * dropout(x) A^T B^T``), with
PEFT's default init (A kaiming-uniform with ``a = sqrt(5)``, B zero, so a fresh layer computes exactly
the base layer), a frozen base weight and bias, and ``merge()`` / ``unmerge()``.

State dicts use the base layer's keys (``weight``, ``bias``; for NF4 the bitsandbytes ``Linear4bit``
keys ``weight``, ``weight.absmax``, ...) plus ``lora_A`` and ``lora_B``, so the base part of a
checkpoint is interchangeable with ``nn.Linear`` / ``bnb.nn.Linear4bit``. The merged flag is not
saved (it would add a key those layers do not have): save unmerged layers.
"""
import math
import numbers
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lora_kernels.autograd import lora_linear, nf4_lora_linear
from lora_kernels.autograd.nf4_lora_linear import nf4_base_linear
from lora_kernels.ops.checks import check_linear_input
from lora_kernels.ops.lora_linear import autocast_enabled
from lora_kernels.ops.nf4 import NF4Weight

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Argument checks: every error names the argument.
# ---------------------------------------------------------------------------------------------
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_lora_config(r, alpha, dropout) -> tuple:
    """(r, alpha, dropout) validated: r >= 1, alpha > 0, dropout in [0, 1)."""
    r = _check_int("r", r, 1)
    alpha = _check_real("alpha", alpha)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    dropout = _check_real("dropout", dropout)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return r, alpha, dropout


def _check_float_dtype(name: str, dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype, got {type(dtype).__name__}")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {dtype}")
    return dtype


def _resolve_adapter_dtype(adapter_dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """The weight's dtype by default; float32 is also allowed (fp32 adapters on a half-precision base,
    PEFT's autocast_adapter_dtype), which is what the fused functionals accept."""
    if adapter_dtype is None:
        return weight_dtype
    adapter_dtype = _check_float_dtype("adapter_dtype", adapter_dtype)
    if adapter_dtype not in (weight_dtype, torch.float32):
        raise ValueError(f"adapter_dtype must be the weight's dtype {weight_dtype} or torch.float32, "
                         f"got {adapter_dtype}")
    return adapter_dtype


def _new_linear_params(in_features, out_features, bias: bool, device, dtype) -> tuple:
    """(weight [out, in], bias [out] or None) initialised as nn.Linear.reset_parameters does, so a freshly
    constructed layer behaves like a fresh nn.Linear; sizes and dtype (default: torch's) checked first."""
    in_features = _check_int("in_features", in_features, 1)
    out_features = _check_int("out_features", out_features, 1)
    dtype = _check_float_dtype("dtype", torch.get_default_dtype() if dtype is None else dtype)
    weight = torch.empty(out_features, in_features, device=device, dtype=dtype)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    b = None
    if bias:
        b = torch.empty(out_features, device=device, dtype=dtype)
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(b, -bound, bound)
    return weight, b


def _bnb_linear4bit_parts(obj):
    """(packed weight, QuantState) of a bitsandbytes Linear4bit, or None for anything else.

    Duck typing (no bitsandbytes import): a module whose weight carries a ``quant_state``, or whose
    class (or a base class: LinearNF4, LinearFP4) is named ``Linear4bit``.
    """
    weight = getattr(obj, "weight", None)
    quant_state = getattr(weight, "quant_state", None)
    named = any(cls.__name__ == "Linear4bit" for cls in type(obj).__mro__)
    if quant_state is None and not named:
        return None
    if quant_state is None:
        # Wrappers such as FSDP can drop the parameter's quant_state; bnb keeps a copy on the module.
        quant_state = getattr(obj, "quant_state", None)
    if quant_state is None or weight is None:
        raise ValueError("linear is a bitsandbytes Linear4bit whose weight is not quantized yet (quant_state is "
                         "None); move it to a device first (e.g. .to('cpu') or .to('cuda'))")
    return weight.data, quant_state


# ---------------------------------------------------------------------------------------------
# Shared LoRA part
# ---------------------------------------------------------------------------------------------
class _LoRALinearBase(nn.Module):
    """LoRA adapters, scale, dropout and merge bookkeeping shared by the dense and the NF4 layer.

    Subclasses provide ``_lora_forward(x)``, ``_merged_forward(x)`` and ``_add_to_weight(delta)``.
    """

    def _init_lora(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                   use_rslora: bool, freeze_A: bool, device, adapter_dtype: torch.dtype) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.use_rslora = r, alpha, bool(use_rslora)
        self.dropout_p = dropout
        # rsLoRA (Kalajdzievski 2023): alpha / sqrt(r) keeps the update's scale stable across ranks.
        self._scale = alpha / (math.sqrt(r) if self.use_rslora else r)
        self._merged = False
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=adapter_dtype))
        self.reset_lora_parameters()
        if freeze_A:
            # LoRA-FA: A stays a (saved, loadable) parameter but is not trained; the fused op then
            # does not save x for backward.
            self.lora_A.requires_grad_(False)

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: lora_A [r, in] kaiming-uniform (a = sqrt(5)), lora_B [out, r] zero,
        so the layer computes exactly its base layer until B is trained."""
        if self._merged:
            raise ValueError("cannot reset the LoRA parameters of a merged layer: call unmerge() first")
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    @property
    def scale(self) -> float:
        """The LoRA scale: alpha / r, or alpha / sqrt(r) with use_rslora; assignable (any finite real).

        The ``r``, ``alpha`` and ``use_rslora`` attributes record the construction arguments;
        changing them later does not change the scale (assign ``scale`` instead)."""
        return self._scale

    @scale.setter
    def scale(self, value) -> None:
        value = _check_real("scale", value)
        if self._merged:
            # The merged weight holds the old scale; unmerge() must subtract exactly what merge() added.
            raise ValueError("cannot change the scale of a merged layer: call unmerge() first")
        self._scale = value

    @property
    def merged(self) -> bool:
        """True after merge() (forward is then the base layer alone), until unmerge()."""
        return self._merged

    def _adapters(self) -> tuple:
        """(lora_A [r, in], lora_B [out, r], scale) used by forward and merge. Variants (DyLoRA) return
        views of a larger adapter and their own scale here."""
        return self.lora_A, self.lora_B, self._scale

    def _delta(self) -> torch.Tensor:
        """scale * B @ A, [out, in] in float32 (merging rounds once, at the final cast)."""
        A, B, scale = self._adapters()
        return scale * (B.detach().float() @ A.detach().float())

    def merge(self) -> None:
        """Fold the adapter into the base weight once: W <- W + scale * B @ A (computed in fp32).

        Afterwards forward computes x W^T + b only (no dropout, no LoRA branch). Raises ValueError if
        already merged.
        """
        if self._merged:
            raise ValueError("the layer is already merged: merging twice would add the adapter twice")
        with torch.no_grad():
            self._add_to_weight(self._delta())
        self._merged = True

    def unmerge(self) -> None:
        """Undo merge(): W <- W - scale * B @ A. Raises ValueError if the layer is not merged."""
        if not self._merged:
            raise ValueError("the layer is not merged: nothing to unmerge")
        with torch.no_grad():
            self._add_to_weight(-self._delta())
        self._merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> y: [..., out_features] in x's dtype."""
        if self._merged:
            return self._merged_forward(x)
        return self._lora_forward(x)

    def _merged_bias(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        # F.linear wants the bias in x's dtype; the fused op also accepts an fp32 bias.
        return None if self.bias is None else self.bias.to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._merged:
            warnings.warn(f"{type(self).__name__} is merged: its state_dict holds the merged weight and the "
                          "adapters, and the merged flag is not saved, so loading it into a fresh (unmerged) "
                          "layer counts the adapter twice; unmerge() before saving, or drop lora_A/lora_B",
                          UserWarning, stacklevel=3)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _lora_extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, scale={self.scale:.4g}, dropout={self.dropout_p:g}, "
                f"use_rslora={self.use_rslora}, bias={self.bias is not None}, merged={self._merged}")


# ---------------------------------------------------------------------------------------------
# Dense base weight
# ---------------------------------------------------------------------------------------------
class LoRALinear(_LoRALinearBase):
    """A linear layer with a frozen dense weight and a LoRA adapter, run by ``lora_kernels.lora_linear``.

        y = x W^T + b + scale * dropout(x) A^T B^T

    Parameters (state_dict keys): ``weight`` [out, in] and ``bias`` [out] (frozen: requires_grad
    False, as PEFT freezes the base layer), ``lora_A`` [r, in], ``lora_B`` [out, r] (trainable; lora_A
    frozen with freeze_A).

    Args:
        in_features, out_features: K and N (>= 1).
        r: rank (>= 1). alpha: > 0; scale = alpha / r, or alpha / sqrt(r) with use_rslora.
        bias: whether the base layer has a bias.
        dropout: in [0, 1); applied to the LoRA branch's input in training mode only.
        freeze_A: LoRA-FA (lora_A not trained).
        device, dtype: of the base weight and bias (dtype float32, float16 or bfloat16; default
            torch.get_default_dtype()). The base weight is initialised like nn.Linear's.
        adapter_dtype: dtype of lora_A / lora_B: dtype (default) or torch.float32.

    Inputs x: [..., in] in the weight's dtype. Use ``from_linear`` to wrap an existing nn.Linear.
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, *, bias: bool = True,
                 dropout: float = 0.0, use_rslora: bool = False, freeze_A: bool = False, device=None,
                 dtype: Optional[torch.dtype] = None, adapter_dtype: Optional[torch.dtype] = None):
        super().__init__()
        weight, b = _new_linear_params(in_features, out_features, bias, device, dtype)
        r, alpha, dropout = _check_lora_config(r, alpha, dropout)
        adapter_dtype = _resolve_adapter_dtype(adapter_dtype, weight.dtype)
        out_features, in_features = weight.shape
        self._init_base(weight, b)
        self._init_lora(in_features, out_features, r, alpha, dropout, use_rslora, freeze_A, weight.device,
                        adapter_dtype)

    def _init_base(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        # Frozen like PEFT's base layer; the fused op refuses a weight that requires grad.
        self.weight = nn.Parameter(weight, requires_grad=False)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    freeze_A: bool = False, adapter_dtype: Optional[torch.dtype] = None) -> "LoRALinear":
        """A LoRALinear on ``linear``'s weight [out, in] and bias [out], sharing their storage (no copy).

        The new layer's weight and bias are new Parameters (requires_grad False) viewing the same
        memory: ``linear``'s own parameters keep their requires_grad flag, and merge() writes into the
        shared weight (so ``linear`` sees the merged weight too). Adapters are created on the weight's
        device, in its dtype unless adapter_dtype (float32) is given. Other arguments as the constructor.
        Raises TypeError if ``linear`` is not a (dense, floating-point) torch.nn.Linear.
        """
        if _bnb_linear4bit_parts(linear) is not None:
            raise TypeError("linear is a bitsandbytes 4-bit Linear4bit; use NF4LoRALinear.from_linear for it")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        if weight.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"linear.weight must be float32, float16 or bfloat16, got {weight.dtype}")
        r, alpha, dropout = _check_lora_config(r, alpha, dropout)
        adapter_dtype = _resolve_adapter_dtype(adapter_dtype, weight.dtype)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._init_base(weight.detach(), None if linear.bias is None else linear.bias.detach())
        out_features, in_features = weight.shape
        module._init_lora(in_features, out_features, r, alpha, dropout, use_rslora, freeze_A, weight.device,
                          adapter_dtype)
        return module

    def _lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B, scale = self._adapters()
        return lora_linear(x, self.weight, A, B, scale, bias=self.bias,
                           dropout_p=self.dropout_p, training=self.training)

    def _merged_forward(self, x: torch.Tensor) -> torch.Tensor:
        # The unmerged call's errors for x (no adapter takes part: a trainable weight is fine here)
        weight = self.weight
        check_linear_input(x, weight.shape, weight.device)
        if x.dtype != weight.dtype and not autocast_enabled(x.device.type):  # autocast casts both
            raise ValueError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
        return F.linear(x, weight, self._merged_bias(x))

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        # In place, in fp32, one rounding to the weight's dtype: storage shared with from_linear's
        # source stays shared.
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))

    def extra_repr(self) -> str:
        return self._lora_extra_repr()


# ---------------------------------------------------------------------------------------------
# NF4 base weight (QLoRA)
# ---------------------------------------------------------------------------------------------
# NF4Weight field -> buffer name. Non-persistent buffers, so that .to(device), .cuda() and
# named_buffers() see them; the state_dict keys are bnb's and written by hand below.
_NF4_BUFFERS = {"packed": "qweight_packed", "absmax": "qweight_absmax", "code": "qweight_code",
                "absmax_code": "qweight_absmax_code", "absmax_scale": "qweight_absmax_scale",
                "absmax_offset": "qweight_absmax_offset"}
# Suffixes of bnb Linear4bit's weight keys (NF4Weight.state_dict(prefix="weight")).
_NF4_KEY_SUFFIXES = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
_QUANT_STATE_KEY = ".quant_state."


def _copy_nf4(q: NF4Weight, device) -> NF4Weight:
    """``q`` with every tensor copied to ``device`` (load_state_dict copies, it does not alias)."""
    return q.map_tensors(lambda name, t: t.to(device, copy=True))


class NF4LoRALinear(_LoRALinearBase):
    """A QLoRA layer: frozen NF4 base weight (``qweight``, a ``lora_kernels.NF4Weight`` [out, in]) and a
    LoRA adapter, run by ``lora_kernels.nf4_lora_linear`` (the weight is decoded inside the GEMMs).

        y = x dequant(qweight)^T + b + scale * dropout(x) A^T B^T

    State dict keys: bitsandbytes Linear4bit's (``weight`` packed uint8 [(out*in+1)//2, 1],
    ``weight.absmax``, ``weight.quant_map``, with double quant ``weight.nested_absmax`` and
    ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``; ``bias`` [out]) plus
    ``lora_A`` [r, in] and ``lora_B`` [out, r]. ``load_state_dict`` accepts those (from this class or
    from a Linear4bit) and also a dense float ``weight`` [out, in] (e.g. a LoRALinear's), which it
    quantizes with this layer's blocksize, double_quant and quant_type, in this layer's dtype (the
    checkpoint's with ``assign=True``).

    The NF4 tensors are non-persistent buffers ``qweight_*``: ``.to(device)`` moves them, but
    ``.to(dtype)`` / ``.half()`` leave them (and qweight.dtype, the dtype the weight is decoded to) as
    they are: the format needs fp32 scales. Bias and adapters are converted as usual.

    Args: as LoRALinear, plus
        dtype: the dequantized weight's dtype (bnb quant_state.dtype) and the bias' dtype.
        blocksize: NF4 block size (64, as bnb); double_quant: quantize the absmax too (bnb
            compress_statistics); quant_type: "nf4" or "fp4" (bnb's two 4-bit tables). The
            constructor quantizes an nn.Linear-style random weight; use ``from_linear`` to wrap an
            nn.Linear or a bnb Linear4bit.
    Inputs x: [..., in] (float32, float16 or bfloat16; lora_A/lora_B must be x's dtype or float32).
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, *, bias: bool = True,
                 dropout: float = 0.0, use_rslora: bool = False, freeze_A: bool = False, device=None,
                 dtype: Optional[torch.dtype] = None, adapter_dtype: Optional[torch.dtype] = None,
                 blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4"):
        super().__init__()
        weight, b = _new_linear_params(in_features, out_features, bias, device, dtype)
        r, alpha, dropout = _check_lora_config(r, alpha, dropout)
        adapter_dtype = _resolve_adapter_dtype(adapter_dtype, weight.dtype)
        out_features, in_features = weight.shape
        self._init_base(NF4Weight.quantize(weight, blocksize=blocksize, double_quant=bool(double_quant),
                                           quant_type=quant_type), b)
        self._init_lora(in_features, out_features, r, alpha, dropout, use_rslora, freeze_A, weight.device,
                        adapter_dtype)

    def _init_base(self, qweight: NF4Weight, bias: Optional[torch.Tensor]) -> None:
        self._qweight = None
        self.qweight = qweight
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    freeze_A: bool = False, adapter_dtype: Optional[torch.dtype] = None,
                    blocksize: Optional[int] = None, double_quant: Optional[bool] = None,
                    quant_type: Optional[str] = None) -> "NF4LoRALinear":
        """An NF4LoRALinear from an nn.Linear or a bitsandbytes ``Linear4bit`` (NF4 or FP4).

        - nn.Linear [out, in]: its weight is quantized (NF4Weight.quantize with blocksize, default 64,
          double_quant, default True, and quant_type, default "nf4"; bytes identical to bnb's); the
          bias [out] is shared.
        - bnb Linear4bit (detected by duck typing; bitsandbytes is not imported): its 4-bit tensors and
          bias are shared, no copy; blocksize / double_quant / quant_type come from its quant state and
          must not be given. It must be quantized already (moved to a device), and not repacked by bnb's CPU
          inference path (run it in eval mode on CPU only after building this layer).
        Bias and weight are frozen (new Parameters / buffers; the source's flags are untouched).
        Adapters are created on the weight's device, in the weight's dtype (bnb quant_state.dtype)
        unless adapter_dtype (float32) is given. Raises TypeError for other objects.
        """
        parts = _bnb_linear4bit_parts(linear)
        if parts is not None:
            given = [name for name, value in (("blocksize", blocksize), ("double_quant", double_quant),
                                              ("quant_type", quant_type)) if value is not None]
            if given:
                raise ValueError(f"{' and '.join(given)} apply only when quantizing an nn.Linear; the bitsandbytes "
                                 "Linear4bit is already quantized")
            qweight = NF4Weight.from_quant_state(*parts)
            if len(qweight.shape) != 2:
                raise ValueError(f"linear's quantized weight must be 2-D [out, in], got shape {qweight.shape}")
        elif isinstance(linear, nn.Linear):
            if linear.weight.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"linear.weight must be float32, float16 or bfloat16, got {linear.weight.dtype}")
            qweight = NF4Weight.quantize(linear.weight.detach(), blocksize=64 if blocksize is None else blocksize,
                                         double_quant=True if double_quant is None else bool(double_quant),
                                         quant_type="nf4" if quant_type is None else quant_type)
        else:
            raise TypeError("linear must be a torch.nn.Linear or a bitsandbytes Linear4bit, got "
                            f"{type(linear).__name__}")
        r, alpha, dropout = _check_lora_config(r, alpha, dropout)
        adapter_dtype = _resolve_adapter_dtype(adapter_dtype, qweight.dtype)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        bias = getattr(linear, "bias", None)
        module._init_base(qweight, None if bias is None else bias.detach())
        out_features, in_features = qweight.shape
        module._init_lora(in_features, out_features, r, alpha, dropout, use_rslora, freeze_A, qweight.device,
                          adapter_dtype)
        return module

    # ---- the NF4 weight ---------------------------------------------------------------------------

    @property
    def qweight(self) -> NF4Weight:
        """The frozen base weight, an NF4Weight of shape [out, in] whose tensors are the qweight_* buffers."""
        q = self._qweight
        buffers = self._buffers
        if any(getattr(q, field) is not buffers[name] for field, name in _NF4_BUFFERS.items()):
            # A buffer was replaced directly (module.qweight_absmax = ...): rebuild (and re-validate).
            q = q.replace_tensors(**{field: buffers[name] for field, name in _NF4_BUFFERS.items()})
            self._qweight = q
        return q

    @qweight.setter
    def qweight(self, q: NF4Weight) -> None:
        if not isinstance(q, NF4Weight):
            raise TypeError(f"qweight must be a lora_kernels.NF4Weight, got {type(q).__name__}")
        if len(q.shape) != 2:
            raise ValueError(f"qweight must be 2-D [out, in], got shape {q.shape}")
        if self._qweight is not None and q.shape != self._qweight.shape:
            raise ValueError(f"qweight must have shape {list(self._qweight.shape)}, got {list(q.shape)}")
        for field, name in _NF4_BUFFERS.items():
            self.register_buffer(name, getattr(q, field), persistent=False)
        self._qweight = q

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) / .half() would convert every floating buffer, but the NF4 scales and
        # tables must stay fp32 (and the codes uint8): the NF4 tensors only follow fn's device.
        saved = {name: self._buffers.pop(name) for name in _NF4_BUFFERS.values()}
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update(saved)
        q = self.qweight  # the property: rebuilt from qweight_* buffers replaced directly

        def move(name, t):
            out = fn(t)
            if t.is_meta and name in ("code", "absmax_code"):
                # to_empty() from meta: fn gives uninitialised memory, but these tables have fixed values
                return q.constant_table(name, out.device)
            return out if out.dtype == t.dtype else t.to(out.device)

        self.qweight = q.map_tensors(move)
        return self

    # ---- forward / merge --------------------------------------------------------------------------

    def _lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B, scale = self._adapters()
        bias = self.bias
        if bias is not None and bias.dtype not in (x.dtype, torch.float32):
            bias = bias.to(x.dtype)  # x of another dtype than the weight's (and bias'): as the merged path
        return nf4_lora_linear(x, self.qweight, A, B, scale, bias=bias,
                               dropout_p=self.dropout_p, training=self.training)

    def _merged_forward(self, x: torch.Tensor) -> torch.Tensor:
        check_linear_input(x, self.qweight.shape, self.qweight.device, "qweight")  # the unmerged call's errors for x
        # No LoRA branch left: bnb's own path (decode to the stored dtype, cast to x's), saving no decoded weight.
        return nf4_base_linear(x, self.qweight, self._merged_bias(x))

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        q = self.qweight
        merged = (q.dequantize(torch.float32) + delta).to(q.dtype)
        # New tensors, not written in place: a bnb Linear4bit this layer was built from keeps its weight.
        self.qweight = NF4Weight.quantize(merged, blocksize=q.blocksize, double_quant=q.double_quant,
                                          quant_type=q.quant_type)

    def merge(self) -> None:
        """Fold the adapter into the NF4 weight: dequantize, add scale * B @ A in fp32, re-quantize.

        Warns (UserWarning): the merged weight is rounded to NF4 again, so the output differs from the
        unmerged one by that rounding, and unmerge() cannot restore the original weight exactly.
        Raises ValueError if already merged. The qweight tensors are replaced, not written in place.
        """
        if self._merged:
            raise ValueError("the layer is already merged: merging twice would add the adapter twice")
        warnings.warn("merging into an NF4 weight dequantizes it, adds scale * B @ A and re-quantizes: the merged "
                      "weight is rounded to NF4 again (outputs change by that rounding error, and unmerge() will "
                      "not restore the original weight exactly)", UserWarning, stacklevel=2)
        super().merge()

    def unmerge(self) -> None:
        """Subtract scale * B @ A from the dequantized weight and re-quantize.

        Warns (UserWarning): not exact, the weight is re-rounded to NF4 a second time. Raises
        ValueError if the layer is not merged.
        """
        if not self._merged:
            raise ValueError("the layer is not merged: nothing to unmerge")
        warnings.warn("unmerging an NF4 weight is not exact: the weight is dequantized, scale * B @ A subtracted "
                      "and the result re-quantized, so it is rounded to NF4 once more and differs from the "
                      "weight before merge()", UserWarning, stacklevel=2)
        super().unmerge()

    # ---- state dict (bnb Linear4bit keys) ---------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # bnb's order: weight, bias, weight.absmax, ...; then lora_A, lora_B (written by nn.Module;
        # re-assigning the existing bias key keeps its position).
        nf4 = self.qweight.state_dict(prefix + "weight")
        destination[prefix + "weight"] = nf4.pop(prefix + "weight")
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination.update(nf4)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        base = prefix + "weight"
        ours = {key for key in state_dict
                if key.startswith(base) and (key[len(base):] in _NF4_KEY_SUFFIXES
                                             or key[len(base):].startswith(_QUANT_STATE_KEY))}
        # nn.Module loads bias / lora_A / lora_B; without the NF4 keys, which it would call unexpected.
        super()._load_from_state_dict({k: v for k, v in state_dict.items() if k not in ours}, prefix,
                                      local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if base not in ours:
            if strict:
                missing_keys.append(base)
            return
        current = self.qweight
        value = state_dict[base]
        try:
            if (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() == 2
                    and not any(k[len(base):].startswith(_QUANT_STATE_KEY) for k in ours)):
                # A dense checkpoint (nn.Linear / LoRALinear): quantize it like this layer's weight, in
                # this layer's dtype unless assign=True (as nn.Module loads a parameter: copy_ converts).
                if tuple(value.shape) != current.shape:
                    raise ValueError(f"the dense weight has shape {list(value.shape)}, expected {list(current.shape)}")
                dtype = value.dtype if local_metadata.get("assign_to_params_buffers", False) else current.dtype
                loaded = NF4Weight.quantize(value.detach().to(current.device, dtype), blocksize=current.blocksize,
                                            double_quant=current.double_quant, quant_type=current.quant_type)
            else:
                loaded = NF4Weight.from_state_dict({k: state_dict[k] for k in ours}, base)
                if loaded.shape != current.shape:
                    raise ValueError(f"the NF4 weight has shape {list(loaded.shape)}, expected {list(current.shape)}")
        except (TypeError, ValueError) as exc:
            error_msgs.append(f"While loading {base!r} into {type(self).__name__}: {exc}")
            return
        if not (local_metadata.get("assign_to_params_buffers", False) or current.device.type == "meta"):
            loaded = _copy_nf4(loaded, current.device)
        self.qweight = loaded

    def extra_repr(self) -> str:
        q = self.qweight
        return (f"{self._lora_extra_repr()}, quant_type={q.quant_type}, qweight_dtype={q.dtype}, "
                f"blocksize={q.blocksize}, double_quant={q.double_quant}")
