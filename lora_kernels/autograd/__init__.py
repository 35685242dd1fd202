"""Autograd layer: registers backward for the custom ops and exposes the public functionals."""
from lora_kernels.autograd.dora import dora_linear
from lora_kernels.autograd.dropout import seeded_dropout
from lora_kernels.autograd.lora_linear import lora_linear
from lora_kernels.autograd.nf4_lora_linear import nf4_lora_linear

__all__ = ["dora_linear", "lora_linear", "nf4_lora_linear", "seeded_dropout"]
