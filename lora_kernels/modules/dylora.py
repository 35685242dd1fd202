"""DyLoRA (Valipour et al. 2023): one adapter trained for every rank up to r_max.

``DyLoRALinear`` / ``NF4DyLoRALinear`` hold lora_A [r_max, in] and lora_B [out, r_max] and run at an
active rank r ≤ r_max on the views A[:r] (contiguous rows) and B[:, :r] (strided columns): the fused
kernels take strides, so nothing is copied. The scale follows the active rank: alpha / r, or
alpha / sqrt(r) with use_rslora.

Active rank per call:
  * ``layer.rank = k`` fixes it (serving a truncated adapter; or one rank per training step set on
    every layer by ``dylora_sample_rank`` / ``dylora_set_rank``);
  * otherwise, in training mode each forward samples r uniformly from [r_min, r_max] with torch's
    RNG (nested-dropout style; per layer and per call), and in eval mode r = r_max.
With ``frozen=True`` (the paper's "frozen" mode) training updates only row r-1 of A and column r-1
of B: the gradients of the lower ranks are zeroed by hooks on the views. Gradients outside the
active rank are zero in both modes (they never reach A[r:], B[:, r:]).

Note: with a sampled rank, recomputing a forward (activation checkpointing) would draw a new rank;
fix the rank for the step with ``dylora_sample_rank(model)`` in that case.
"""
import math
from typing import Optional

import torch
from torch import nn

from lora_kernels.modules.lora_linear import LoRALinear, NF4LoRALinear, _check_int


def _zero_lower_rows(rank: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:rank - 1] = 0
        return grad
    return hook


def _zero_lower_columns(rank: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:, :rank - 1] = 0
        return grad
    return hook


class _DyLoRAMixin:
    """Active-rank views of the adapters; put before LoRALinear / NF4LoRALinear in the bases."""

    def _init_dylora(self, r_min, frozen) -> None:
        r_min = _check_int("r_min", r_min, 1)
        if r_min > self.r:
            raise ValueError(f"r_min must be <= r_max = {self.r}, got {r_min}")
        if not isinstance(frozen, bool):
            raise TypeError(f"frozen must be a bool, got {type(frozen).__name__}")
        self.r_min, self.frozen = r_min, frozen
        self._rank: Optional[int] = None

    @property
    def r_max(self) -> int:
        return self.r

    @property
    def rank(self) -> Optional[int]:
        """The fixed active rank, or None (sampled in training, r_max in eval)."""
        return self._rank

    @rank.setter
    def rank(self, value: Optional[int]) -> None:
        self._rank = self._checked_rank(value)

    def _checked_rank(self, value: Optional[int]) -> Optional[int]:
        """``value`` if this layer can take it as its rank, else ValueError / TypeError."""
        if value is not None:
            value = _check_int("rank", value, 1)
            if value > self.r:
                raise ValueError(f"rank must be <= r_max = {self.r}, got {value}")
        if self._merged and value != self._rank:
            raise ValueError("cannot change the rank of a merged layer: call unmerge() first")
        return value

    def scale_for_rank(self, r: int) -> float:
        """alpha / r, or alpha / sqrt(r) with use_rslora, for a rank 1 <= r <= r_max."""
        r = _check_int("r", r, 1)
        if r > self.r:
            raise ValueError(f"r must be <= r_max = {self.r}, got {r}")
        return self._scale_at(r)

    def _scale_at(self, r: int) -> float:  # r already checked (each call's rank: no checks on that path)
        return self.alpha / (math.sqrt(r) if self.use_rslora else r)

    @property
    def scale(self) -> float:
        """The scale at the fixed rank, or at r_max when the rank is sampled (read only)."""
        return self._scale_at(self._rank or self.r)

    @scale.setter
    def scale(self, value) -> None:
        raise ValueError("a DyLoRA layer's scale follows its active rank (alpha / r): set alpha at construction")

    def _call_rank(self) -> int:
        if self._rank is not None:
            return self._rank
        if self.training:
            return int(torch.randint(self.r_min, self.r + 1, (1,)).item())  # CPU RNG: no device sync
        return self.r

    def _views(self, r: int) -> tuple:
        return self.lora_A[:r], self.lora_B[:, :r], self._scale_at(r)

    def _adapters(self) -> tuple:
        r = self._call_rank()
        A, B, scale = self._views(r)
        if self.frozen and self.training and r > 1 and torch.is_grad_enabled():
            if A.requires_grad:
                A.register_hook(_zero_lower_rows(r))
            if B.requires_grad:
                B.register_hook(_zero_lower_columns(r))
        return A, B, scale

    def _delta(self) -> torch.Tensor:
        # merge() folds the fixed rank (r_max when none is fixed), never a sampled one
        A, B, scale = self._views(self._rank or self.r)
        return scale * (B.detach().float() @ A.detach().float())

    def _lora_extra_repr(self) -> str:
        return (super()._lora_extra_repr() + f", r_min={self.r_min}, rank={self._rank}, frozen={self.frozen}")


class DyLoRALinear(_DyLoRAMixin, LoRALinear):
    """``LoRALinear`` with adapters of rank r_max usable at any rank r_min ≤ r ≤ r_max (see module doc).

    Args: as LoRALinear with ``r`` replaced by ``r_max``, plus r_min (≥ 1, ≤ r_max) and frozen.
    """

    def __init__(self, in_features: int, out_features: int, r_max: int, alpha: float, *, r_min: int = 1,
                 frozen: bool = False, **kwargs):
        super().__init__(in_features, out_features, r_max, alpha, **kwargs)
        self._init_dylora(r_min, frozen)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r_max: int, alpha: float, *, r_min: int = 1, frozen: bool = False,
                    **kwargs) -> "DyLoRALinear":
        """A DyLoRALinear sharing ``linear``'s weight and bias (see LoRALinear.from_linear)."""
        module = super().from_linear(linear, r_max, alpha, **kwargs)
        module._init_dylora(r_min, frozen)
        return module


class NF4DyLoRALinear(_DyLoRAMixin, NF4LoRALinear):
    """``NF4LoRALinear`` (QLoRA) with DyLoRA adapters (see module doc and DyLoRALinear)."""

    def __init__(self, in_features: int, out_features: int, r_max: int, alpha: float, *, r_min: int = 1,
                 frozen: bool = False, **kwargs):
        super().__init__(in_features, out_features, r_max, alpha, **kwargs)
        self._init_dylora(r_min, frozen)

    @classmethod
    def from_linear(cls, linear, r_max: int, alpha: float, *, r_min: int = 1, frozen: bool = False,
                    **kwargs) -> "NF4DyLoRALinear":
        """An NF4DyLoRALinear from an nn.Linear or a bitsandbytes Linear4bit (see NF4LoRALinear.from_linear)."""
        module = super().from_linear(linear, r_max, alpha, **kwargs)
        module._init_dylora(r_min, frozen)
        return module


def _dylora_layers(model: nn.Module) -> list:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, _DyLoRAMixin)]
    if not layers:
        raise ValueError("model has no DyLoRA layers (DyLoRALinear / NF4DyLoRALinear)")
    return layers


def dylora_set_rank(model: nn.Module, rank: Optional[int]) -> int:
    """Fix the active rank of every DyLoRA layer in ``model`` (None: back to sampling); returns the count."""
    layers = _dylora_layers(model)
    ranks = [layer._checked_rank(rank) for layer in layers]  # every layer checked before any changes
    for layer, value in zip(layers, ranks):
        layer._rank = value
    return len(layers)


def dylora_sample_rank(model: nn.Module, generator: Optional[torch.Generator] = None) -> int:
    """Draw one rank uniformly from [r_min, r_max] (shared by every DyLoRA layer of ``model``, which
    must agree on both) and fix it on all of them: the paper's one rank per training step. Returns it."""
    layers = _dylora_layers(model)
    bounds = {(m.r_min, m.r_max) for m in layers}
    if len(bounds) != 1:
        raise ValueError(f"the DyLoRA layers of model have different (r_min, r_max): {sorted(bounds)}; "
                         "set ranks per layer with layer.rank instead")
    r_min, r_max = bounds.pop()
    if generator is not None and not (isinstance(generator, torch.Generator) and generator.device.type == "cpu"):
        raise TypeError(f"generator must be None or a CPU torch.Generator, got {generator!r}")
    rank = int(torch.randint(r_min, r_max + 1, (1,), generator=generator).item())
    dylora_set_rank(model, rank)
    return rank
