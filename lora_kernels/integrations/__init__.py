"""Interoperability with other libraries' objects. Each submodule imports its library lazily, inside
functions, so importing lora_kernels never imports them."""
