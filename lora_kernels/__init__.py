"""lora-kernels: fused LoRA / QLoRA kernels for PyTorch fine-tuning."""
from lora_kernels.autograd import dora_linear, lora_linear, nf4_lora_linear, seeded_dropout
from lora_kernels.modules import (DyLoRALinear, LoRALinear, NF4DyLoRALinear, NF4LoRALinear, dylora_sample_rank,
                                  dylora_set_rank)
from lora_kernels.integrations.loraplus import loraplus_param_groups
from lora_kernels.integrations.peft import PatchReport, patch_peft_model, unpatch_peft_model
from lora_kernels.ops.nf4 import NF4Weight

__version__ = "0.1.0"
__all__ = ["lora_linear", "nf4_lora_linear", "dora_linear", "seeded_dropout", "NF4Weight", "LoRALinear", "NF4LoRALinear",
           "patch_peft_model", "unpatch_peft_model", "PatchReport", "loraplus_param_groups", "DyLoRALinear",
           "NF4DyLoRALinear", "dylora_sample_rank", "dylora_set_rank", "profile_memory",
           "__version__"]


def __getattr__(name):
    # profile_memory lives in the tools layer: imported on first use, so that `import lora_kernels`
    # does not import the tools.
    if name == "profile_memory":
        from lora_kernels.tools.profile import profile_memory

        return profile_memory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
