"""Convert a PEFT model in place: its LoRA layers keep everything and run on lora_kernels.

``patch_peft_model`` swaps the class of every ``peft.tuners.lora.Linear`` and
``peft.tuners.lora.bnb.Linear4bit`` instance (and AdaLoRA's ``adalora.SVDLinear`` /
``adalora.bnb.SVDLinear4bit``, whose E is folded into A) for a subclass whose forward calls
``lora_kernels.lora_linear`` / ``nf4_lora_linear``. The instance keeps its Parameter objects
(optimizer state stays valid) and stays a PEFT tuner layer: a look-alike module with the same
attribute names would make ``save_pretrained`` write zero adapter tensors without a warning. The
subclass adds no parameters or buffers, so state_dicts and adapter files are unchanged.

Every call re-checks the layer's state and takes PEFT's own forward for whatever the fast path does
not implement (disabled or merged adapters, ``adapter_names=`` mixed batches, several active
adapters with dropout in training or DoRA, LoRA variants other than DoRA, extra arguments...): never a
wrong answer. Several active adapters otherwise run as one call, stacked along the rank. DoRA runs as
``lora_kernels.dora_linear``: g * (the fused LoRA output) + bias, the row norms computed without
forming W + s B A. Under autocast the fast path runs in its dtype, as PEFT's matmuls do. Scaling is
read on every call (alpha/r, rsLoRA, ``set_scale``). Dropout draws its mask from torch's RNG like
PEFT but through lora_kernels' own generator, so with dropout > 0 the masks differ from PEFT's.

peft and bitsandbytes are imported inside the functions only.
"""
import dataclasses
import importlib
import inspect
import sys
from typing import Optional

import torch

from lora_kernels.autograd import dora_linear, lora_linear, nf4_lora_linear
from lora_kernels.autograd.dora import tensor_cache_key
from lora_kernels.ops.lora_linear import autocast_enabled
from lora_kernels.ops.nf4 import QUANT_TYPES, NF4Weight

_ORIGINAL_CLASS = "_lora_kernels_original_class"
_A_REQUIRES_GRAD = "_lora_kernels_lora_A_requires_grad"  # adapter -> requires_grad before lora_fa
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FAST_CLASSES: dict = {}  # PEFT class -> its fast subclass, built on first use


@dataclasses.dataclass
class PatchReport:
    """What ``patch_peft_model`` did: swapped layers by PEFT class, layers left on PEFT's own path
    (module name -> reason), and how many lora_A weights ``lora_fa=True`` froze."""
    swapped: dict
    left_on_peft: dict
    frozen_lora_A: int = 0

    @property
    def num_swapped(self) -> int:
        return sum(self.swapped.values())

    def __str__(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in self.swapped.items()) or "none"
        lines = [f"lora_kernels: swapped {kinds}; froze {self.frozen_lora_A} lora_A"]
        lines += [f"  left on PEFT: {name}: {why}" for name, why in self.left_on_peft.items()]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- call-time rule

def _active_adapters(layer) -> tuple:
    """(the active adapters with LoRA weights, in PEFT's order, None), or (None, reason) if none is."""
    lora_A = _child(layer, "lora_A")
    active = layer.active_adapters
    if len(active) == 1 and active[0] in lora_A:  # the common case, without building a list
        return active, None
    active = [a for a in active if a in lora_A]
    return (active, None) if active else (None, "no active adapter")


# The per-call reads below go to the modules' own dicts: an attribute that nn.Module.__getattr__
# resolves (submodules, parameters) and a ModuleDict lookup cost ~1-2 us each on a CPU, and a patched
# layer's call made about ten of them, as much as one kernel launch.

_ABSENT = object()


def _child(module, name: str):
    """``getattr(module, name)`` for a submodule or parameter (e.g. ``layer.lora_A``, ``linear.weight``;
    None for a parameter registered as None, such as a Linear's bias=False)."""
    found = module._modules.get(name, _ABSENT)
    if found is _ABSENT:
        found = module._parameters.get(name, _ABSENT)
    return found if found is not _ABSENT else getattr(module, name)


def _adapter_entry(layer, name: str, adapter: str):
    """``layer.<name>[adapter]``: a module of a ModuleDict or a parameter of a ParameterDict."""
    container = _child(layer, name)
    entry = container._modules.get(adapter)
    if entry is None:
        entry = container._parameters.get(adapter)
    return entry if entry is not None else container[adapter]


def fallback_reason(layer, x, args=(), kwargs=None) -> Optional[str]:
    """None if this call of ``layer`` (a patched PEFT LoRA layer) can run on lora_kernels with PEFT's
    exact semantics, else the reason it takes PEFT's own forward (for a layer ``patch_peft_model``
    did not swap, e.g. a LoRA Embedding or one left on PEFT: that it is not patched)."""
    if not is_patched(layer):
        return (f"{type(layer).__module__}.{type(layer).__name__} is not patched by lora_kernels "
                "(patch_peft_model's report lists the layers it left on PEFT and why)")
    return _fast_plan(layer, x, args, kwargs or {})[0]


def _base_layer(layer) -> torch.nn.Module:
    """The module the PEFT layer wraps (its ``base_layer`` child), through the module dict: an
    attribute read through nn.Module.__getattr__ costs ~1 us. Not PEFT's ``get_base_layer()``, which
    walks down a chain of wrappers: a tuner layer in between (a PeftMixedModel's LoHa under a LoRA)
    adds its own term, so the fast path must see that and step aside."""
    return layer._modules["base_layer"]


def _fast_plan(layer, x, args, kwargs) -> tuple:
    """(None, (active adapters, base layer, its dense weight [N, K] (``_dense_weight``; None for a bnb
    Linear4bit), its bias, A, B of a single adapter (None for several), whether the base is a bnb
    Linear4bit, the dropout probability of this call)) when this call can run on lora_kernels, else
    (reason, None): what the check resolves, the fast forward reuses (a per-call cost of every LoRA
    layer)."""
    if args or any(v is not None for v in kwargs.values()):
        return "extra forward arguments (adapter_names=, variant or base-layer arguments)", None
    if layer.disable_adapters:
        return "adapters disabled", None
    if layer.merged:
        return "adapters merged", None
    adapters, why = _active_adapters(layer)
    if why:
        return why, None
    base = _base_layer(layer)
    stock, linear4bit = _stock_forward(base)
    why = _base_type_reason(base, stock) or _base_call_reason(base, stock)
    if why:
        return why, None
    for adapter in adapters:
        why = _adapter_reason(layer, adapter) or _adapter_call_reason(layer, adapter)
        if why:
            return why, None
    if len(adapters) > 1:
        why = _several_adapters_reason(layer, adapters)
        if why:
            return why, None
    if not isinstance(x, torch.Tensor) or x.dtype not in _SUPPORTED_DTYPES:
        return f"input dtype {getattr(x, 'dtype', type(x).__name__)}", None
    # Under autocast PEFT's matmuls (base, lora_A, lora_B) all run in its dtype, and lora_kernels'
    # functions cast their inputs to it as well: the dtype checks below then do not apply.
    autocast = autocast_enabled(x.device.type)
    for adapter in adapters:
        A, B = _lora_A_weight(layer, adapter), _lora_B_weight(layer, adapter)
        if (not autocast and A.dtype != x.dtype
                and (A.dtype != torch.float32 or not getattr(layer, "cast_input_dtype_enabled", True))):
            return f"adapter dtype {A.dtype} with input dtype {x.dtype}", None
        if A.device != x.device or B.device != x.device:
            return "adapters on another device than the input", None
        if not A.shape[0]:  # AdaLoRA's budget can prune a layer to rank 0 (ZeRO-3: a placeholder)
            return (ZERO3_PARTITIONED_REASON if hasattr(A, "ds_id") else "adapter of rank 0"), None
        scaling = layer.scaling[adapter]
        if isinstance(scaling, torch.Tensor):
            if scaling.numel() != 1:
                return f"a scaling tensor of shape {list(scaling.shape)}", None
            if scaling.requires_grad and torch.is_grad_enabled():
                return "a scaling tensor that requires grad", None
    dropout_p = 0.0  # several adapters: none in training (_several_adapters_reason)
    if len(adapters) > 1:
        A = B = None  # _fast_forward stacks the adapters' tensors
    else:
        dropout_p = _dropout_p(layer, adapters[0])
        if dropout_p >= 1:  # nn.Dropout(p=1) zeros its input; the kernels need p < 1
            return "lora_dropout p = 1 in training", None
    bias = _child(base, "bias")
    if not autocast and bias is not None and bias.dtype not in (x.dtype, torch.float32) and not linear4bit:
        return f"bias dtype {bias.dtype}", None
    why = None
    weight = None if linear4bit else _dense_weight(base)
    if linear4bit:
        why = _linear4bit_reason(base, x, autocast)
    elif weight.device != x.device:
        why = "base weight on another device than the input"
    elif weight.requires_grad:
        why = "the base weight is trainable"
    elif not autocast and weight.dtype != x.dtype:
        why = f"base weight dtype {weight.dtype} with input dtype {x.dtype}"
    return (why, None) if why else (None, (adapters, base, weight, bias, A, B, linear4bit, dropout_p))


def static_fallback_reason(layer, adapter: str) -> Optional[str]:
    """Why ``adapter`` of ``layer`` always needs PEFT's forward (a LoRA variant other than PEFT's
    linear DoRA, dropout module, base layer type: nn.Linear, transformers' Conv1D or a bnb Linear4bit,
    whose class keeps the stock forward), or None. Hooks and an instance's own forward can come and
    go: each call checks them."""
    base = _base_layer(layer)
    return _adapter_reason(layer, adapter) or _base_type_reason(base, _stock_forward(base)[0])


def _adapter_reason(layer, adapter: str) -> Optional[str]:
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if _is_dora(layer, adapter):
        if variant is not None and type(variant).__name__ != "DoraLinearVariant":
            return f"DoRA variant {type(variant).__name__}"
    elif variant is not None:
        return f"LoRA variant {type(variant).__name__}"
    dropout = _adapter_entry(layer, "lora_dropout", adapter)
    if not isinstance(dropout, (torch.nn.Dropout, torch.nn.Identity)):
        return f"dropout module {type(dropout).__name__}"
    return None


def _adapter_call_reason(layer, adapter: str) -> Optional[str]:
    """Why calling the adapter's modules, as PEFT does (lora_A(x), lora_B(h), DoRA's magnitude layer),
    now does more than the fast path, which reads their weights, or None: a wrapper in their place
    (FSDP1 under peft's fsdp_auto_wrap_policy, which HF Trainer applies, wraps each of them: outside
    the wrapper's forward their weights are flat shards), their own forward (accelerate's hook that only
    aligns devices aside, as for the base layer), or hooks (FSDP2's fully_shard of them gathers their
    weights in hooks). Every call: ~1 us."""
    modules = layer._modules
    for name in ("lora_A", "lora_B"):
        module = modules[name]._modules.get(adapter)  # None: AdaLoRA's bare Parameters
        if module is not None and (module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                                   or module._backward_hooks or type(module).forward is not _LINEAR_FORWARD
                                   or ("forward" in module.__dict__
                                       and not _stock_instance_forward(module, _LINEAR_FORWARD))):
            return _module_call_reason(module, name)
    magnitude = modules.get("lora_magnitude_vector")
    module = magnitude._modules.get(adapter) if magnitude is not None else None
    if module is not None and (module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                               or module._backward_hooks
                               # nn.DataParallel's replicas hold their weights as plain tensor attributes
                               or ("weight" not in module._parameters and not module.__dict__.get("_is_replica"))
                               or ("forward" in module.__dict__
                                   and not _stock_instance_forward(module, type(module).forward))):
        return _module_call_reason(module, "lora_magnitude_vector")
    return None


_LINEAR_FORWARD = torch.nn.Linear.forward


def _has_hooks(module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks)


def _module_call_reason(module, name: str) -> str:
    """The reason ``_adapter_call_reason`` found for ``module`` (``layer.<name>[adapter]``)."""
    if _has_hooks(module):
        return f"hooks on {name} (e.g. FSDP2's fully_shard of the adapters, which gathers their weights there)"
    if "forward" in module.__dict__:
        return f"{name} {type(module).__name__} with its own forward"
    return (f"{name} is a {type(module).__name__} (e.g. FSDP1 wrapping the adapters, as peft's "
            f"fsdp_auto_wrap_policy does: their weights are shards outside the wrapper's forward)")


def _stock_forward(base) -> tuple:
    """(the forward of the layer type ``base`` is, or None for a type the fast path does not take,
    whether it is a bnb Linear4bit)."""
    if _is_linear4bit(base):  # before nn.Linear: Linear4bit subclasses it
        return sys.modules["bitsandbytes"].nn.Linear4bit.forward, True
    if isinstance(base, torch.nn.Linear):
        return torch.nn.Linear.forward, False
    if _is_conv1d(base):
        return sys.modules["transformers.pytorch_utils"].Conv1D.forward, False
    return None, False


def _base_type_reason(base, stock) -> Optional[str]:
    """Why the class of ``base`` needs its own call (``stock``: ``_stock_forward``), or None."""
    if stock is None:  # e.g. another tuner's layer (a PeftMixedModel): peft.tuners.loha.layer.Linear
        return f"base layer {type(base).__module__}.{type(base).__qualname__}"
    if type(base).forward is not stock:  # a subclass with its own forward (QAT fake-quant, ...)
        return f"base layer {type(base).__name__} with its own forward"
    return None


# torch.nn.modules.module's global hook dicts (register_module_forward_hook, ...): torch adds to and
# removes from these same objects, so holding them spares a module lookup per call
_GLOBAL_HOOKS = tuple(getattr(sys.modules[torch.nn.Module.__module__], name) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")
    if isinstance(getattr(sys.modules[torch.nn.Module.__module__], name, None), dict))


def _base_call_reason(base, stock) -> Optional[str]:
    """Why calling ``base`` (of a type ``_base_type_reason`` takes) now runs more than its weight's
    matmul: an instance's own forward or hooks (PEFT calls base_layer(x); the fast path only reads its
    tensors), or None."""
    if "forward" in base.__dict__ and not _stock_instance_forward(base, stock):
        return f"base layer {type(base).__name__} with its own forward"
    if (base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks
            or any(_GLOBAL_HOOKS)):
        return ZERO3_HOOKS_REASON if hasattr(_child(base, "weight"), "ds_id") else "hooks on the base layer"
    return None


# DeepSpeed ZeRO-3 partitions each parameter (an empty placeholder, its real shape in ds_shape) and
# gathers a module's own parameters in hooks around that module's forward: the fast path reads the
# base layer's and the adapters' weights without calling those modules. Checked on a CPU (deepspeed
# 0.19.8, one gloo process): without leaf modules every call runs PEFT's forward, with the reason
# below; with set_z3_leaf_modules DeepSpeed gathers the whole LoRA layer at its forward, the fast
# path runs, and loss, gradients and the step equal unpatched PEFT's.
ZERO3_HOOKS_REASON = ("DeepSpeed ZeRO-3 gathers the base layer's weight in its hooks (call "
                      "deepspeed.utils.set_z3_leaf_modules(model, [peft.tuners.lora.Linear]) before "
                      "deepspeed.initialize to run the fused path)")
ZERO3_PARTITIONED_REASON = "DeepSpeed ZeRO-3 parameters not gathered (outside a forward of the layer)"


def _stock_instance_forward(base, stock) -> bool:
    """Whether the instance forward of ``base`` calls only ``stock``: the stock forward bound to it (what
    accelerate's remove_hook_from_module leaves), or accelerate's wrapper (``add_hook_to_module``, as
    ``device_map`` over several GPUs installs on every layer) with an AlignDevicesHook that only moves
    the inputs to its execution device (no offloaded weights to load): with x already on the device of
    the weights, which ``_fast_plan`` checks, that call is a no-op."""
    forward = base.__dict__["forward"]
    if getattr(forward, "__func__", None) is stock and getattr(forward, "__self__", None) is base:
        return True
    hook = base.__dict__.get("_hf_hook")
    old_forward = base.__dict__.get("_old_forward")
    return (type(hook).__name__ == "AlignDevicesHook" and not getattr(hook, "offload", True)
            and getattr(old_forward, "__func__", None) is stock)


def _is_conv1d(module) -> bool:
    """Whether ``module`` is transformers' Conv1D (GPT-2's projections: y = x W + b with W [K, N], the
    layers PEFT wraps with fan_in_fan_out=True). Without an import, as ``_is_linear4bit``."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def _dense_weight(base) -> torch.Tensor:
    """The base layer's dense weight as [N, K] (out_features x in_features), as the fused functions
    take it: an nn.Linear's own, a Conv1D's [K, N] weight transposed (a view: no copy). What PEFT's
    fan_in_fan_out describes only matters for merging; the forward is the base layer's own."""
    weight = _child(base, "weight")
    return weight if isinstance(base, torch.nn.Linear) or not _is_conv1d(base) else weight.t()


def _is_linear4bit(module) -> bool:
    # No module is a Linear4bit while bitsandbytes has not been imported (by anyone): no import here,
    # which would cost a microsecond on every call of every layer.
    bnb = sys.modules.get("bitsandbytes")
    linear4bit = getattr(getattr(bnb, "nn", None), "Linear4bit", None)
    return linear4bit is not None and isinstance(module, linear4bit)


def _linear4bit_reason(base, x, autocast: bool) -> Optional[str]:
    state = getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)
    if state is None:
        return "bitsandbytes weight not quantized yet"
    if state.quant_type not in QUANT_TYPES:
        return f"quant type {state.quant_type}"
    if base.weight.device != x.device:
        return "base weight on another device than the input"
    if getattr(state, "packing_format_for_cpu", False):
        return "bitsandbytes repacked the weight for its CPU kernel"
    if (not autocast and base.compute_dtype is not None and base.compute_dtype != x.dtype
            and not (base.compute_dtype == torch.float32 and state.dtype == x.dtype)):
        # bnb casts x to its compute dtype. An fp32 one (bitsandbytes' and transformers' default, kept
        # for fp16 inputs) multiplies values of x's dtype (x, and W decoded to a stored dtype equal to
        # x's) exactly in fp32, as the fused kernels' fp32-accumulated dots in x's dtype do: the same
        # product to summation order, then rounded to x's dtype by both. Other mixes would change it.
        return f"compute dtype {base.compute_dtype} with input dtype {x.dtype}"
    return None


# ----------------------------------------------------------------------------- fast forward

def _is_adalora(layer, adapter: str) -> bool:
    return adapter in getattr(layer, "lora_E", {})


def _lora_A_weight(layer, adapter: str) -> torch.Tensor:
    """lora_A [r, K]: a Linear's weight in LoRA layers, a bare Parameter in AdaLoRA's SVD layers."""
    a = _adapter_entry(layer, "lora_A", adapter)
    return a if isinstance(a, torch.Tensor) else _child(a, "weight")


def _lora_B_weight(layer, adapter: str) -> torch.Tensor:
    b = _adapter_entry(layer, "lora_B", adapter)
    return b if isinstance(b, torch.Tensor) else _child(b, "weight")


# (adapter, device) -> (tensor_cache_key, value) of ranknum / of a tensor scaling (``_tensor_value``)
_RANKNUM_CACHE = "_lora_kernels_ranknum"
_SCALING_CACHE = "_lora_kernels_scaling"


def _tensor_value(layer, cache_name: str, adapter: str, tensor: torch.Tensor) -> float:
    """The value of a one-element device tensor of ``layer`` as a float. Reading it costs a device
    sync, so the value is kept in ``layer.__dict__[cache_name]`` until the tensor's storage or version
    counter changes (an in-place write, a new tensor; not a write through ``.data``), one entry per
    adapter and device (nn.DataParallel's replicas share the dict)."""
    key = tensor_cache_key(tensor)
    cache = layer.__dict__.setdefault(cache_name, {})
    entry = cache.get((adapter, tensor.device))
    if entry is None or entry[0] != key:
        entry = cache[(adapter, tensor.device)] = (key, float(tensor.detach().float().cpu()))
    return entry[1]


def _adalora_rank_divisor(layer, adapter: str) -> float:
    """AdaLoRA's ranknum + 1e-5 as a float (PEFT creates a new ranknum whenever the rank changes; its
    one write through ``.data`` comes before any forward)."""
    return _tensor_value(layer, _RANKNUM_CACHE, adapter, _adapter_entry(layer, "ranknum", adapter)) + 1e-5


def _scaling(layer, adapter: str):
    """``layer.scaling[adapter]``: a float, or a one-element tensor after PEFT's
    ``prepare_model_for_compiled_hotswap`` (so that a hotswap, which writes it in place, does not
    recompile a compiled model). A tensor's value is read once per write (``_tensor_value``; a write
    through ``.data`` is not seen). The tensor itself is returned while torch.compile traces (no
    value to read) and for an inference tensor (made under torch.inference_mode: no version counter
    tells its writes): ``_adapter_tensors`` folds it into lora_B."""
    scaling = layer.scaling[adapter]
    if not isinstance(scaling, torch.Tensor):
        return scaling
    if torch.compiler.is_compiling() or scaling.is_inference():
        return scaling
    return _tensor_value(layer, _SCALING_CACHE, adapter, scaling)


def _adapter_tensors(layer, adapter: str, A: torch.Tensor, B: torch.Tensor) -> tuple:
    """(A [r, K], B [N, r], lora_B bias or None, scale) with PEFT's semantics of the layer class;
    A, B: the layer's lora_A / lora_B weights of ``adapter`` (``_lora_A_weight``, ``_lora_B_weight``).

    AdaLoRA's SVD form ΔW = B (A ⊙ E) · scaling / (ranknum + 1e-5), E [r, 1] the singular values with
    pruned ranks zeroed by its rank allocator: E is folded into A (an r×K product, as PEFT computes it),
    so the fused kernels run unchanged and autograd gives A and E their gradients."""
    scaling = _scaling(layer, adapter)
    if _is_adalora(layer, adapter):
        E = _adapter_entry(layer, "lora_E", adapter)
        if torch.compiler.is_compiling():  # ranknum as a tensor in the graph (no value to read)
            ranknum = _adapter_entry(layer, "ranknum", adapter)
            return A * (E * (scaling / (ranknum + 1e-5)).to(E.dtype)), B, None, 1.0
        divisor = _adalora_rank_divisor(layer, adapter)
        if isinstance(scaling, torch.Tensor):  # an inference tensor (``_scaling``): folded in, as into B below
            return A * (E * (scaling / divisor)), B, None, 1.0
        return A * E, B, None, scaling / divisor
    lora_B_bias = _child(_adapter_entry(layer, "lora_B", adapter), "bias")
    if isinstance(scaling, torch.Tensor):  # (``_scaling``) a 0-d tensor: B keeps its dtype, the scale is not
        # rounded to it (PEFT multiplies its output by the fp32 scale)
        return A, B * scaling, None if lora_B_bias is None else lora_B_bias * scaling, 1.0
    return A, B, lora_B_bias, scaling


def _dropout_p(layer, adapter: str) -> float:
    """The dropout probability this call applies to ``adapter``'s input: 0 for nn.Identity or in eval mode."""
    dropout = _adapter_entry(layer, "lora_dropout", adapter)
    return float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0


def _several_adapters_reason(layer, adapters: list) -> Optional[str]:
    """Why several active adapters of ``layer`` cannot run as one fused call (``_stacked_adapter_tensors``),
    or None."""
    if any(_is_dora(layer, a) for a in adapters):
        return "several active adapters, one with DoRA"
    if any(_dropout_p(layer, a) for a in adapters):
        # PEFT draws an independent mask per adapter; one stacked A would share a single mask
        return "several active adapters with dropout in training"
    if (len({_lora_A_weight(layer, a).dtype for a in adapters}) > 1
            or len({_lora_B_weight(layer, a).dtype for a in adapters}) > 1):
        return "several active adapters of different dtypes"
    return None


def _stacked_adapter_tensors(layer, adapters: list) -> tuple:
    """(A [R, K], B [N, R], lora_B bias or None, scale) of the active ``adapters`` stacked along the
    rank (R = sum of their ranks), so that one fused call gives PEFT's sum over adapters

        sum_i s_i (B_i A_i x + b_i) = s_1 (B_R A_R x + sum_i (s_i / s_1) b_i),  B_R = [(s_i / s_1) B_i]

    without dropout (``_several_adapters_reason``). The stacking is differentiable (each adapter's
    weights get their own gradients) and costs one copy of the adapters per call; a B_i is rescaled
    only where its adapter's scale differs from the first one's."""
    tensors = [_adapter_tensors(layer, a, _lora_A_weight(layer, a), _lora_B_weight(layer, a)) for a in adapters]
    scale = tensors[0][3]
    if scale == 0:  # set_scale(adapter, 0) on the first: stack with unit scale instead
        scale = 1.0
    ratios = [s / scale for _, _, _, s in tensors]
    A = torch.cat([a for a, _, _, _ in tensors])
    B = torch.cat([b if ratio == 1 else b * ratio for (_, b, _, _), ratio in zip(tensors, ratios)], dim=1)
    biases = [b_bias if ratio == 1 else b_bias * ratio
              for (_, _, b_bias, _), ratio in zip(tensors, ratios) if b_bias is not None]
    lora_B_bias = None if not biases else biases[0] if len(biases) == 1 else torch.stack(biases).sum(0)
    return A, B, lora_B_bias, scale


def _fast_forward(layer, x: torch.Tensor, plan: tuple) -> torch.Tensor:
    """The layer's forward on lora_kernels; ``plan`` from ``_fast_plan``."""
    adapters, base, weight, bias, A, B, linear4bit, dropout_p = plan
    adapter = adapters[0]
    if len(adapters) > 1:
        A, B, lora_B_bias, scale = _stacked_adapter_tensors(layer, adapters)
    else:
        A, B, lora_B_bias, scale = _adapter_tensors(layer, adapter, A, B)
    common = dict(bias=bias, lora_B_bias=lora_B_bias, dropout_p=dropout_p, training=dropout_p > 0)
    if _is_dora(layer, adapter):
        return _dora_forward(layer, adapter, base, weight, x, A, B, scale, linear4bit, common)
    if linear4bit:
        qweight = _linear4bit_weight(base, x)
        if common["bias"] is not None and common["bias"].dtype not in (x.dtype, torch.float32):
            common["bias"] = common["bias"].to(x.dtype)  # bnb adds the bias in its compute dtype
        y = nf4_lora_linear(x, qweight, A, B, scale, **common)
        # bnb returns its matmul in x's dtype (under autocast too); PEFT adds the LoRA term to that
        return y.to(torch.promote_types(x.dtype, y.dtype))
    return lora_linear(x, weight, A, B, scale, **common)


# ----------------------------------------------------------------------------- DoRA

def _is_dora(layer, adapter: str) -> bool:
    return bool(getattr(layer, "use_dora", {}).get(adapter, False))


def _dora_forward(layer, adapter, base, weight, x, A, B, scale: float, linear4bit: bool,
                  common: dict) -> torch.Tensor:
    """PEFT's DoRA forward on the fused kernels: ``lora_kernels.dora_linear`` (the row norms without
    forming W + scale B A, the dropout mask regenerated from its seed), with PEFT's output dtype.
    weight: the dense base weight [N, K] (``_dense_weight``), None for a bnb Linear4bit."""
    if linear4bit:
        weight = _linear4bit_weight(base, x)
        # bnb's output dtype is x's (under autocast too), and PEFT's bnb layer casts nothing back while
        # torch.is_autocast_enabled() (CUDA's autocast only): its DoRA sum then stays fp32
        out_dtype = torch.float32 if torch.is_autocast_enabled() else x.dtype
    else:
        out_dtype = None  # nn.Linear's (and Conv1D's) output dtype: the fused layer's
    # ||W_n||^2 of the frozen base weight, kept on the base layer (not while compiling: see row_sqnorm)
    cache = None if torch.compiler.is_compiling() else base.__dict__.setdefault(_ROW_SQNORM_CACHE, {})
    y = dora_linear(x, weight, A, B, layer.lora_magnitude_vector[adapter].weight, scale, bias=common["bias"],
                    dropout_p=common["dropout_p"], training=common["training"], out_dtype=out_dtype,
                    norm_cache=cache)
    # PEFT's DoRA scales by a [1, N] row, which makes an unbatched x's [N] result [1, N]: give its shape
    return y.unsqueeze(0) if x.dim() == 1 else y


_ROW_SQNORM_CACHE = "_lora_kernels_row_sqnorm"  # on the base module: dora_linear's norm_cache


_NF4_CACHE = "_lora_kernels_nf4"  # on the bnb module: (key, NF4Weight sharing its tensors)


def _linear4bit_weight(base, x: torch.Tensor) -> NF4Weight:
    """The NF4Weight of a bnb Linear4bit for a call on ``x`` (``_cached_nf4``), after what bnb's own
    forward leaves behind: its compute dtype fixed from the first x, and its bias cast in place to the
    dtype it computes in (the compute dtype, else x's). PEFT's model then saves, and its optimizer
    updates, the bias in that dtype: a patched model must too. (Not while compiling: a graph cannot
    replace a parameter's data; a compiled PEFT layer runs bnb's own forward.)"""
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    bias = base._parameters.get("bias")
    if bias is not None and not torch.compiler.is_compiling():
        dtype = base.compute_dtype if base.compute_dtype is not None else x.dtype
        if bias.dtype != dtype:
            bias.data = bias.data.to(dtype)
    return _cached_nf4(base)


def _cached_nf4(base) -> NF4Weight:
    """The NF4Weight view of a bnb Linear4bit, rebuilt only when its weight or quant state object
    changes: the view shares bnb's tensors, and rebuilding it (with its checks) costs tens of
    microseconds per layer and call, as much as a decode-sized kernel."""
    from lora_kernels.integrations.bitsandbytes import nf4_from_bnb

    state = getattr(base.weight, "quant_state", None) or base.quant_state
    # While dynamo traces, the weight's identity instead of its storage address: torch 2.9's dynamo
    # recurses without end through bnb Params4bit's __torch_function__ on data_ptr() (2.11 does not).
    weight_key = ("id", id(base.weight)) if torch.compiler.is_compiling() else ("ptr", base.weight.data_ptr())
    key = (weight_key, id(state), id(state.absmax), id(state.state2))
    cached = base.__dict__.get(_NF4_CACHE)
    if cached is None or cached[0] != key:
        cached = (key, nf4_from_bnb(base))
        base.__dict__[_NF4_CACHE] = cached
    return cached[1]


class _FastLoRAForward:
    """Mixin placed before the PEFT layer class: fast forward when ``fallback_reason`` allows."""

    def merge(self, *args, **kwargs):
        # The merged weight replaces the base weight (bnb: new 4-bit tensors), and merge_and_unload
        # then drops this layer: caches of the old weight on the base layer would keep it alive.
        _drop_caches(self)
        return super().merge(*args, **kwargs)

    def unmerge(self, *args, **kwargs):
        _drop_caches(self)
        return super().unmerge(*args, **kwargs)

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names):
        # PEFT's merge_and_unload() / unload() call this where a layer has it (else they merge and take
        # get_base_layer(), as here): the base layer leaves with bnb's CPU repacking as before patching.
        peft_s = getattr(super(), "unload_and_optionally_merge_module", None)
        if peft_s is not None:
            base = peft_s(merge=merge, safe_merge=safe_merge, adapter_names=adapter_names)
        else:
            if merge:
                self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            base = self.get_base_layer()
        _restore_bnb_repacking(_base_layer(self))
        return base

    def set_adapter(self, *args, **kwargs):
        # PEFT's set_adapter (also run by add_adapter) makes the active adapters' weights trainable
        # and the others frozen: a layer patched with lora_fa=True keeps its lora_A frozen.
        out = super().set_adapter(*args, **kwargs)
        if _A_REQUIRES_GRAD in self.__dict__:
            _freeze_lora_A(self, record=tuple(self.lora_A))
        return out

    def set_requires_grad(self, adapter_names, *args, **kwargs):
        # PEFT's set_requires_grad (run by load_adapter(is_trainable=True)) sets the flags of the
        # named adapters' weights: lora_A stays frozen under lora_fa=True.
        out = super().set_requires_grad(adapter_names, *args, **kwargs)
        if _A_REQUIRES_GRAD in self.__dict__:
            _freeze_lora_A(self, record=(adapter_names,) if isinstance(adapter_names, str) else tuple(adapter_names))
        return out

    def forward(self, x, *args, **kwargs):
        why, plan = _fast_plan(self, x, args, kwargs)
        if why is None:
            self._check_forward_args(x, *args, **kwargs)
            return _fast_forward(self, x, plan)
        return super().forward(x, *args, **kwargs)


def _peft_classes() -> dict:
    """PEFT layer class -> short name, for the classes lora_kernels can swap."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError as exc:
        raise ImportError("patch_peft_model needs peft (pip install peft)") from exc
    classes = {Linear: "lora.Linear"}
    try:
        from peft.tuners.adalora.layer import SVDLinear
        classes[SVDLinear] = "adalora.SVDLinear"
    except ImportError:
        pass
    for module, name, short in (("peft.tuners.lora.bnb", "Linear4bit", "lora.bnb.Linear4bit"),
                                ("peft.tuners.adalora.bnb", "SVDLinear4bit", "adalora.bnb.SVDLinear4bit")):
        try:  # peft defines these only when bitsandbytes imports
            classes[getattr(importlib.import_module(module), name)] = short
        except (ImportError, AttributeError):
            pass
    return classes


def build_peft_layer(layer_class, base_layer: torch.nn.Module, config, r: int, lora_alpha: float,
                     adapter_name: str = "default"):
    """A PEFT tuner layer of ``layer_class`` (``peft.tuners.lora.layer.Linear``, ``adalora.SVDLinear``...)
    around ``base_layer`` (e.g. an ``nn.Linear`` [N, K]), with rank ``r``, ``lora_alpha`` and the other
    settings of ``config`` (a ``LoraConfig`` / ``AdaLoraConfig``: dropout, rsLoRA, lora_bias, DoRA...),
    on every PEFT release lora_kernels supports: what ``get_peft_model`` builds, for one layer.

    Why: from PEFT 0.19 these layers take ``config=`` and read their settings from it; earlier ones take
    each setting as its own keyword and silently drop a ``config=`` into ``**kwargs``, so a layer built
    the new way on PEFT 0.17 or 0.18 has no dropout, rsLoRA, lora_bias or DoRA, without an error."""
    params = inspect.signature(layer_class.__init__).parameters
    if "config" in params:
        return layer_class(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha)
    settings = {name: getattr(config, name) for name in params
                if name not in ("self", "base_layer", "adapter_name", "r", "lora_alpha") and hasattr(config, name)
                and params[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return layer_class(base_layer, adapter_name, r=r, lora_alpha=lora_alpha, **settings)


def _fast_class(peft_class):
    cls = _FAST_CLASSES.get(peft_class)
    if cls is None:
        # LoRAKernelsLinear, LoRAKernelsLinear4bit, LoRAKernelsSVDLinear, LoRAKernelsSVDLinear4bit
        name = f"LoRAKernels{peft_class.__name__}"
        cls = type(name, (_FastLoRAForward, peft_class), {"__module__": __name__, "__qualname__": name})
        # setdefault: threads unpickling models at once all get the class the first one stored (two
        # classes would make one thread's layers "not patched")
        cls = _FAST_CLASSES.setdefault(peft_class, cls)
        globals()[name] = cls  # a module-level name: pickling a patched model works
    return cls


def __getattr__(name: str):
    # A patched model pickled (torch.save(model), deepcopy across processes) names its layers'
    # classes, e.g. lora_kernels.integrations.peft.LoRAKernelsLinear; a fresh process that has not
    # patched anything yet builds that class here when unpickling asks for it.
    if name.startswith("LoRAKernels"):
        try:
            classes = _peft_classes()
        except ImportError:
            classes = {}
        for peft_class in classes:
            if f"LoRAKernels{peft_class.__name__}" == name:
                return _fast_class(peft_class)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _freeze_lora_A(layer, record: tuple = ()) -> int:
    """LoRA-FA on a layer patched with lora_fa=True: freeze every lora_A, recording for
    unpatch_peft_model the flags they had: for adapters not recorded yet, and for those in ``record``
    (whose flags PEFT has just set: they replace older records); returns how many were trainable."""
    before = layer.__dict__[_A_REQUIRES_GRAD]
    frozen = 0
    for adapter in layer.lora_A:
        weight = _lora_A_weight(layer, adapter)
        if adapter in record or adapter not in before:
            before[adapter] = weight.requires_grad
        frozen += int(weight.requires_grad)
        weight.requires_grad_(False)
    return frozen


def _drop_caches(layer) -> None:
    """Forget what the fast path cached on a PEFT layer and its base layer (rebuilt when needed)."""
    base = _base_layer(layer)
    base.__dict__.pop(_NF4_CACHE, None)
    base.__dict__.pop(_ROW_SQNORM_CACHE, None)
    layer.__dict__.pop(_RANKNUM_CACHE, None)
    layer.__dict__.pop(_SCALING_CACHE, None)


def is_patched(module) -> bool:
    return type(module) in _FAST_CLASSES.values()


# ----------------------------------------------------------------------------- public API

def patch_peft_model(model: torch.nn.Module, *, lora_fa: bool = False) -> PatchReport:
    """Swap, in place, every PEFT ``lora.Linear`` / ``lora.bnb.Linear4bit`` (and AdaLoRA ``SVDLinear`` /
    ``SVDLinear4bit``: its rank allocator and orthogonality loss keep working) in ``model`` for a
    subclass running lora_kernels' fused layer. Parameters, names, optimizer state, state_dict,
    ``save_pretrained`` and ``merge_and_unload`` are unchanged.

    Args:
        model: a PEFT model (or any module containing PEFT LoRA layers).
        lora_fa: freeze every lora_A of the swapped layers (LoRA-FA): backward then keeps only
            h = dropout(x) A^T [M, r] per layer, not x. An lora_A frozen by the user is honoured
            either way. ``unpatch_peft_model`` restores the previous requires_grad.
    Returns:
        A ``PatchReport``: layers swapped per PEFT class, layers left on PEFT's path and why.
    Raises:
        ValueError: the model has no PEFT LoRA layers, or every one is patched already, or it was
            patched with the other ``lora_fa``.

    Layers PEFT creates after patching (``add_adapter`` / ``load_adapter`` of an adapter with other
    target modules) are PEFT's own: calling ``patch_peft_model`` again, with the same ``lora_fa``,
    swaps those and leaves the patched ones as they are.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(lora_fa, bool):
        raise TypeError(f"lora_fa must be a bool, got {type(lora_fa).__name__}")
    classes = _peft_classes()
    from peft.tuners.lora.layer import LoraLayer

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError("model has no PEFT LoRA layers to patch (expected peft.tuners.lora layers, e.g. "
                         "from peft.get_peft_model)")
    patched = [(name, m) for name, m in layers if is_patched(m)]
    other_mode = [name for name, m in patched if (_A_REQUIRES_GRAD in m.__dict__) != lora_fa]
    if other_mode:
        raise ValueError(f"model was patched with lora_fa={not lora_fa} ({len(other_mode)} layers, e.g. "
                         f"{other_mode[0]!r}): patch its new layers with the same lora_fa, or call "
                         "unpatch_peft_model first")
    if len(patched) == len(layers):
        raise ValueError(f"model is already patched ({len(patched)} layers, e.g. {patched[0][0]!r}) and has no "
                         "new layer to patch; call unpatch_peft_model first to patch it anew")
    report = PatchReport(swapped={}, left_on_peft={})
    for name, module in layers:
        if is_patched(module):
            continue
        kind = classes.get(type(module))
        if kind is None:
            report.left_on_peft[name] = f"{type(module).__module__}.{type(module).__name__} is not supported " \
                                        f"(only {', '.join(classes.values())})"
            continue
        static = [why for a in module.lora_A if (why := static_fallback_reason(module, a))]
        if static and len(static) == len(module.lora_A):
            report.left_on_peft[name] = static[0]
            continue
        setattr(module, _ORIGINAL_CLASS, type(module))
        module.__class__ = _fast_class(type(module))
        _keep_bnb_from_repacking(module)
        report.swapped[kind] = report.swapped.get(kind, 0) + 1
        if lora_fa:
            setattr(module, _A_REQUIRES_GRAD, {})
            report.frozen_lora_A += _freeze_lora_A(module)
    return report


_BNB_CPU_REPACKING = "_lora_kernels_support_avx512bf16_for_cpu"  # on the bnb module: its flag before patching


def _keep_bnb_from_repacking(layer) -> None:
    """Turn off bitsandbytes' CPU repacking of a patched layer's Linear4bit (restored by unpatching).

    bitsandbytes (0.50) repacks the weight and rewrites its quant_state, for good, in its own forward of
    an eval-mode layer on an input without grad, on a CPU with AVX512-BF16. In a patched layer that
    forward runs only for a call on PEFT's path (``adapter_names=``, ``disable_adapter()``...), and the
    repacked weight then kept every later call on PEFT's path, whose training forward on it drops the
    input's gradient (bitsandbytes' gemv_4bit has no autograd); threads on the fast path meanwhile read
    a quant_state half rewritten (AttributeError: no attribute 'state2'). Without repacking,
    bitsandbytes decodes the weight as in training (its repacked kernel computes in bf16: calls on
    PEFT's path then differ from unpatched PEFT's by that rounding, ~3e-3). A weight repacked before
    patching stays so (its inverse re-quantizes the absmax: other bytes) and that layer keeps PEFT's
    path. merge_and_unload() / unload() restore the flag, as unpatching does (not PeftMixedModel's
    unload, which does not ask the layer: unpatch first there)."""
    base = _base_layer(layer)
    if _is_linear4bit(base) and getattr(base, "support_avx512bf16_for_cpu", False):
        base.__dict__[_BNB_CPU_REPACKING] = base.support_avx512bf16_for_cpu
        base.support_avx512bf16_for_cpu = False


def _restore_bnb_repacking(base) -> None:
    if _BNB_CPU_REPACKING in base.__dict__:
        base.support_avx512bf16_for_cpu = base.__dict__.pop(_BNB_CPU_REPACKING)


def unpatch_peft_model(model: torch.nn.Module) -> int:
    """Restore PEFT's classes (and lora_A requires_grad changed by ``lora_fa``); returns the number
    of layers restored. Raises ValueError if ``model`` has no patched layer."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    restored = 0
    for module in model.modules():
        if not is_patched(module):
            continue
        module.__class__ = getattr(module, _ORIGINAL_CLASS)
        delattr(module, _ORIGINAL_CLASS)
        for adapter, flag in getattr(module, _A_REQUIRES_GRAD, {}).items():
            if adapter in module.lora_A:
                _lora_A_weight(module, adapter).requires_grad_(flag)
        if hasattr(module, _A_REQUIRES_GRAD):
            delattr(module, _A_REQUIRES_GRAD)
        _restore_bnb_repacking(_base_layer(module))
        _drop_caches(module)
        restored += 1
    if not restored:
        raise ValueError("model has no layers patched by lora_kernels.patch_peft_model")
    return restored
