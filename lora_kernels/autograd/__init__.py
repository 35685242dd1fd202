"""Autograd layer: registers backward for the custom ops and exposes the public functional."""
from lora_kernels.autograd.lora_linear import lora_linear

__all__ = ["lora_linear"]
