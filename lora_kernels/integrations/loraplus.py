"""LoRA+ (Hayou et al. 2024): train B with a learning rate ``ratio`` times A's.

``loraplus_param_groups`` returns torch optimizer parameter groups, usable with any optimizer class,
grouped exactly as PEFT's ``peft.optimizers.create_loraplus_optimizer`` groups them (same four groups,
same order, same learning rates and weight decays), for PEFT models (patched or not) and for models
built from ``lora_kernels.LoRALinear`` / ``NF4LoRALinear``. The groups are PEFT 0.21's: before it,
PEFT's function never recognised a LoRA Embedding, so its lora_embedding_A/B went to the A/B groups
and ``loraplus_lr_embedding`` was never used; here they get ``lr_embedding`` on every PEFT release.
"""
import math
import numbers
from typing import Optional

import torch
from torch import nn


def _layernorm_classes() -> tuple:
    # transformers' ALL_LAYERNORM_LAYERS is what PEFT (through get_parameter_names) excludes from decay.
    try:
        from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
        return tuple(ALL_LAYERNORM_LAYERS)
    except ImportError:
        return (nn.LayerNorm,)


def _peft_lora_embedding_class():
    try:
        from peft.tuners.lora.layer import Embedding
        return Embedding
    except ImportError:
        return None


def _decay_parameter_names(model: nn.Module) -> set:
    """Names of parameters that take weight decay, as PEFT decides (transformers' get_parameter_names):
    every parameter not below a layer-norm child module, minus those with "bias" in the name."""
    norms = _layernorm_classes()

    def names(module: nn.Module, prefix: str) -> list:
        found = []
        for child_name, child in module.named_children():
            if not isinstance(child, norms):
                found += names(child, f"{prefix}{child_name}.")
        return found + [prefix + k for k in module._parameters]

    return {n for n in names(model, "") if "bias" not in n}


def _check_positive(name: str, value, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value}")
    return value


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, *, weight_decay: float = 0.0,
                          lr_embedding: Optional[float] = 1e-6) -> list:
    """Parameter groups for LoRA+: ``torch.optim.AdamW(loraplus_param_groups(model, lr=2e-4), lr=2e-4)``.

    Only parameters with requires_grad are grouped, in ``model.named_parameters()`` order:
      1. A group: everything not below: lr, weight_decay;
      2. embedding group: parameters of PEFT LoRA ``Embedding`` layers: lr_embedding, weight_decay;
      3. B group: parameters named ``*lora_B*`` or 1-D (biases, ...) that take weight decay (not in a
         layer norm, no "bias" in the name): lr * ratio, weight_decay;
      4. B group without decay: the other ``lora_B`` / 1-D parameters: lr * ratio, weight decay 0.
    The same grouping as PEFT's ``create_loraplus_optimizer(model, cls, lr=lr, loraplus_lr_ratio=ratio,
    loraplus_weight_decay=weight_decay, loraplus_lr_embedding=lr_embedding)``.

    Args:
        model: any nn.Module holding LoRA layers.
        lr: A's learning rate (> 0).
        ratio: B's learning rate over A's (> 0; the paper recommends ≥ 1, e.g. 16).
        weight_decay: weight decay of groups 1-3 (≥ 0).
        lr_embedding: learning rate of LoRA embedding parameters (> 0); None uses ``lr``.
    Returns:
        A list of four dicts with keys "params", "lr", "weight_decay" (empty groups are kept, as PEFT does).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    lr = _check_positive("lr", lr)
    ratio = _check_positive("ratio", ratio)
    if not 0.0 < lr * ratio < math.inf:
        raise ValueError(f"lr * ratio (lora_B's learning rate) must be > 0 and finite, got {lr} * {ratio} = {lr * ratio}")
    weight_decay = _check_positive("weight_decay", weight_decay, allow_zero=True)
    lr_embedding = lr if lr_embedding is None else _check_positive("lr_embedding", lr_embedding)
    decay = _decay_parameter_names(model)
    embedding_cls = _peft_lora_embedding_class()
    modules = dict(model.named_modules())
    groups = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # PEFT adapter weights sit in a ModuleDict/ParameterDict below the tuner layer
        # (<layer>.lora_embedding_A.default): strip two name parts to find the layer. As PEFT, none for
        # a parameter of the model itself (a bare tuner layer passed as the model)
        owner_name = ".".join(name.split(".")[:-2])
        owner = modules.get(owner_name) if owner_name else None
        if embedding_cls is not None and isinstance(owner, embedding_cls):
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["B" if name in decay else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    if not any(groups.values()):
        raise ValueError("model has no parameters that require grad: nothing to optimize")
    return [
        {"params": groups["A"], "lr": lr, "weight_decay": weight_decay},
        {"params": groups["embedding"], "lr": lr_embedding, "weight_decay": weight_decay},
        {"params": groups["B"], "lr": lr * ratio, "weight_decay": weight_decay},
        {"params": groups["B_no_decay"], "lr": lr * ratio, "weight_decay": 0.0},
    ]


def loraplus_optimizer(model: nn.Module, optimizer_cls=torch.optim.AdamW, *, lr: float, ratio: float = 16.0,
                       weight_decay: float = 0.0, lr_embedding: Optional[float] = 1e-6, **optimizer_kwargs):
    """``optimizer_cls(loraplus_param_groups(model, lr, ratio, ...), lr=lr, **optimizer_kwargs)``."""
    groups = loraplus_param_groups(model, lr, ratio, weight_decay=weight_decay, lr_embedding=lr_embedding)
    return optimizer_cls(groups, lr=lr, **optimizer_kwargs)
