"""Conversions between ``NF4Weight`` and bitsandbytes objects (Params4bit, Linear4bit, QuantState).

bitsandbytes is imported inside the functions only. Conversions share tensors (no copies) wherever
the layouts agree, which is everywhere except a packed weight that must be viewed as uint8.
"""
from typing import Optional

import torch

from lora_kernels.ops.nf4 import NF4Weight


def _import_bnb():
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ImportError("this conversion needs bitsandbytes (pip install bitsandbytes)") from exc
    return bitsandbytes


def nf4_from_bnb(obj) -> NF4Weight:
    """An ``NF4Weight`` sharing storage with a quantized bnb weight.

    obj: a ``bnb.nn.Params4bit``, a ``bnb.nn.Linear4bit``, or a ``(packed, QuantState)`` pair as
    returned by ``bitsandbytes.functional.quantize_4bit`` (packed in any quant_storage dtype); NF4 or
    FP4 (the result's ``quant_type``). Raises TypeError for other objects and ValueError for other
    quant types or not-yet-quantized weights.
    """
    if isinstance(obj, (tuple, list)):
        if len(obj) != 2 or not isinstance(obj[0], torch.Tensor):
            raise TypeError("expected a (packed tensor, QuantState) pair, got a "
                            f"{type(obj).__name__} of {[type(x).__name__ for x in obj]}")
        return NF4Weight.from_quant_state(obj[0], obj[1])
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    if bnb is None or not isinstance(obj, (bnb.nn.Params4bit, bnb.nn.Linear4bit)):
        raise TypeError("nf4_from_bnb expects a bitsandbytes Params4bit, Linear4bit or (packed, QuantState) "
                        f"pair, got {type(obj).__name__}")
    module, param = (obj, obj.weight) if isinstance(obj, bnb.nn.Linear4bit) else (getattr(obj, "module", None), obj)
    quant_state = getattr(param, "quant_state", None)
    if quant_state is None and module is not None:
        # Wrappers such as FSDP can drop the parameter's quant_state; bnb keeps a copy on the module.
        quant_state = getattr(module, "quant_state", None)
    if quant_state is None:
        raise ValueError("the bitsandbytes weight is not quantized yet (quant_state is None); move it to a "
                         "device (e.g. .to('cuda')) first")
    return NF4Weight.from_quant_state(param.data, quant_state)


def nf4_to_bnb(nf4: NF4Weight):
    """``(Params4bit, QuantState)`` sharing ``nf4``'s tensors; requires_grad is False.

    ``bitsandbytes.functional.dequantize_4bit(params.data, quant_state)`` decodes the same weight as
    ``nf4.dequantize()``.
    """
    if not isinstance(nf4, NF4Weight):
        raise TypeError(f"nf4 must be an NF4Weight, got {type(nf4).__name__}")
    bnb = _import_bnb()
    QuantState = bnb.functional.QuantState
    state2 = None
    if nf4.double_quant:
        state2 = QuantState(absmax=nf4.absmax_scale, code=nf4.absmax_code, blocksize=nf4.nested_blocksize,
                            dtype=torch.float32)
    quant_state = QuantState(absmax=nf4.absmax, shape=torch.Size(nf4.shape), code=nf4.code, blocksize=nf4.blocksize,
                             quant_type=nf4.quant_type, dtype=nf4.dtype, offset=nf4.absmax_offset, state2=state2)
    params = bnb.nn.Params4bit(nf4.packed, requires_grad=False, quant_state=quant_state, blocksize=nf4.blocksize,
                               compress_statistics=nf4.double_quant, quant_type=nf4.quant_type,
                               quant_storage=torch.uint8, bnb_quantized=True)
    return params, quant_state


def linear4bit_from_nf4(nf4: NF4Weight, bias: Optional[torch.Tensor] = None):
    """A ``bnb.nn.Linear4bit`` (out_features, in_features = nf4.shape) holding ``nf4`` without copies.

    bias: optional [out_features] tensor on nf4's device; it becomes the module's bias parameter
    (sharing storage, keeping bias.requires_grad). compute_dtype is left unset, as bnb's default.
    """
    if not isinstance(nf4, NF4Weight):
        raise TypeError(f"nf4 must be an NF4Weight, got {type(nf4).__name__}")
    if len(nf4.shape) != 2:
        raise ValueError(f"a Linear4bit weight must be 2-D [out_features, in_features], got shape {nf4.shape}")
    out_features, in_features = nf4.shape
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape [{out_features}], got {list(bias.shape)}")
        if bias.device != nf4.device:
            raise ValueError(f"bias must be on the weight's device {nf4.device}, got {bias.device}")
    bnb = _import_bnb()
    # Built on the meta device so that no [out, in] float weight is allocated, then given our tensors.
    module = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compress_statistics=nf4.double_quant,
                               quant_type=nf4.quant_type, quant_storage=torch.uint8, device="meta")
    params, quant_state = nf4_to_bnb(nf4)
    params.module = module
    module.weight = params
    module.quant_state = quant_state
    if bias is not None:
        module.bias = torch.nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
    return module
