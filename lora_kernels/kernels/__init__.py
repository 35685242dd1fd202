"""Triton kernels (lowest layer). Nothing here checks arguments: ``lora_kernels.ops`` does."""
