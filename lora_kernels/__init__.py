"""lora-kernels: fused LoRA / QLoRA kernels for PyTorch fine-tuning."""
from lora_kernels.autograd import lora_linear

__version__ = "0.1.0"
__all__ = ["lora_linear", "__version__"]
