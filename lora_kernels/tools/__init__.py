"""Measurement tools: ``bench`` (fwd/bwd timings vs PEFT and the base linear) and ``memory``
(saved activations and peak memory). Run them with ``python -m lora_kernels {bench,memory,all}``."""
