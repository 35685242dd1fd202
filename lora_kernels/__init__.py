"""lora-kernels: fused LoRA / QLoRA kernels for PyTorch fine-tuning."""
from lora_kernels.autograd import lora_linear, nf4_lora_linear
from lora_kernels.modules import LoRALinear, NF4LoRALinear
from lora_kernels.integrations.loraplus import loraplus_param_groups
from lora_kernels.integrations.peft import PatchReport, patch_peft_model, unpatch_peft_model
from lora_kernels.ops.nf4 import NF4Weight

__version__ = "0.1.0"
__all__ = ["lora_linear", "nf4_lora_linear", "NF4Weight", "LoRALinear", "NF4LoRALinear", "patch_peft_model",
           "unpatch_peft_model", "PatchReport", "loraplus_param_groups",
           "__version__"]
