"""Swap-in ``nn.Module`` layers built on the fused functionals (no PEFT needed).

Layering: kernels -> ops -> autograd -> modules -> integrations. Nothing here imports
``lora_kernels.integrations`` or bitsandbytes (bnb Linear4bit modules are read by duck typing).
"""
from lora_kernels.modules.dylora import DyLoRALinear, NF4DyLoRALinear, dylora_sample_rank, dylora_set_rank
from lora_kernels.modules.lora_linear import LoRALinear, NF4LoRALinear

__all__ = ["LoRALinear", "NF4LoRALinear", "DyLoRALinear", "NF4DyLoRALinear", "dylora_sample_rank", "dylora_set_rank"]
