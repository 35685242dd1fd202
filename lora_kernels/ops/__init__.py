"""Ops layer: argument checks, the PyTorch spec, Triton launchers and torch.library registration."""
from lora_kernels.ops.checks import check_lora_linear_args
from lora_kernels.ops.dropout_mask import dropout_keep_mask, new_dropout_seed
from lora_kernels.ops.lora_linear import (CPU_BACKEND_ENV, lora_linear_backward, lora_linear_bwd, lora_linear_composite,
                                         lora_linear_forward, lora_linear_fwd, select_backend)
from lora_kernels.ops.reference import lora_linear_reference

__all__ = ["check_lora_linear_args", "dropout_keep_mask", "new_dropout_seed", "CPU_BACKEND_ENV",
           "lora_linear_backward", "lora_linear_bwd", "lora_linear_composite", "lora_linear_forward",
           "lora_linear_fwd", "select_backend", "lora_linear_reference"]
