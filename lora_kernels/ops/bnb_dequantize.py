"""bitsandbytes' own dequantize kernel as a slab decoder of the large-M NF4 route.

That route (``triton_launch._cublas_base_forward``, from configs.NF4_CUBLAS_MIN_M rows) decodes the
base weight a bounded slab of rows at a time for cuBLAS. On the H200 run
(benchmarks/results/nvidia-h200/bench_qlora_bfloat16.json, M = 8192, 4096 x 14336) bitsandbytes'
forward (``bnb_matmul_4bit``: dequantize_4bit, then the matmul) took 0.04 ms more than the dense
matmul, the route with our Triton slab decode of that commit 0.42 ms more. A slab of whole rows
that starts on a quantization block is a contiguous range of the packed codes and of the block
scales, which bitsandbytes' kernel decodes as it decodes a whole weight: the values are its
``dequantize_4bit``'s, bit for bit, as our decoders' are. Its host cost is higher (one or two
bitsandbytes ops per slab against one Triton launch).

Used only when bitsandbytes is already imported (PEFT's and transformers' QLoRA layers import it; the
ops layer imports no bitsandbytes) and the weight's quant type is known on the host
(``ops.nf4.checked_quant_type``: reading the code table would make the host wait for the GPU).
"""
import sys
from typing import Optional

import torch

from lora_kernels.ops.nf4 import SUPPORTED_BLOCKSIZES, checked_quant_type

# Block sizes bitsandbytes' 8-bit blockwise dequantize takes (the nested absmax of double quantization).
BNB_BLOCKWISE_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)


def bnb_dequantize_loaded(device_type: str) -> bool:
    """Whether bitsandbytes is imported, has registered the torch ops used here and, for CUDA tensors,
    loaded its native library: when that fails to load, bitsandbytes still imports and registers its
    ops, with a stand-in library that raises when a kernel is called."""
    if "bitsandbytes" not in sys.modules:
        return False
    try:
        torch.ops.bitsandbytes.dequantize_4bit.default
        torch.ops.bitsandbytes.dequantize_blockwise.default
    except (AttributeError, RuntimeError):
        return False
    if device_type == "cuda":
        library = getattr(sys.modules.get("bitsandbytes.cextension"), "lib", None)
        return type(library).__name__ != "ErrorHandlerMockBNBNativeLibrary"
    return True


def bnb_rows_quant_type(wq, n_start: int, k_start: int, k_end: int) -> Optional[str]:
    """The quant type ("nf4" / "fp4") to hand bitsandbytes' kernel when it can decode the slab
    W[n_start:, k_start:k_end] of ``wq`` (an ``NF4Tensors``): whole rows (k_start 0, k_end K) from a
    block boundary (n_start * K % blocksize == 0), block sizes it takes, a code table whose type is
    known, bitsandbytes loaded; else None."""
    if k_start != 0 or k_end != wq.K or (n_start * wq.K) % wq.blocksize or wq.blocksize not in SUPPORTED_BLOCKSIZES:
        return None
    if wq.double_quant and wq.nested_blocksize not in BNB_BLOCKWISE_SIZES:
        return None
    if not bnb_dequantize_loaded(wq.packed.device.type):
        return None
    return checked_quant_type(wq.code)


def bnb_dequantize_rows(wq, n_start: int, n_end: int, quant_type: str, dtype: torch.dtype) -> torch.Tensor:
    """W[n_start:n_end] of ``wq`` as a contiguous [n_end - n_start, K] tensor in ``dtype`` (each value
    rounded to wq.dtype first, as dequantize_4bit(...).to(dtype)), by bitsandbytes' kernel
    (``bnb_rows_quant_type`` first: it gives ``quant_type``)."""
    K, blocksize = wq.K, wq.blocksize
    start, stop = n_start * K, n_end * K
    if stop == start:
        return torch.empty((n_end - n_start, K), dtype=dtype, device=wq.packed.device)
    first, end = start // blocksize, -(-stop // blocksize)
    # A flat shape: bitsandbytes' CUDA kernel reads only the element count, and its CPU kernel (the
    # CPU tests) decodes rows whose length is a multiple of 16 but not of the block size wrongly.
    flat = torch.ops.bitsandbytes.dequantize_4bit.default(
        wq.packed[start // 2:(stop + 1) // 2], _block_scales(wq, first, end), blocksize, quant_type,
        [stop - start], wq.dtype)
    rows = flat.view(n_end - n_start, K)
    return rows if dtype == wq.dtype else rows.to(dtype)


def with_decoded_scales(wq):
    """``wq`` (an ``NF4Tensors``) with its double-quantized block scales decoded once, fp32 [n_blocks]
    as bitsandbytes' dequantize_4bit forms them (the same values: an elementwise decode), so that each
    of several slabs is decoded by one bitsandbytes op instead of three (host time per slab); ``wq``
    itself when its scales are fp32 already. Extra memory: 4 bytes per 64 weights, for the call."""
    if not wq.double_quant:
        return wq
    return wq._replace(absmax=_block_scales(wq, 0, wq.absmax.shape[0]), absmax_code=None, absmax_scale=None,
                       absmax_offset=None)


def _block_scales(wq, first: int, end: int) -> torch.Tensor:
    """fp32 scales of quantization blocks [first, end), as bitsandbytes' dequantize_4bit forms them:
    with double quantization its 8-bit blockwise dequantize of the nested codes, from the start of
    the nested block holding ``first``, then ``+= offset`` (two fp32 roundings)."""
    if not wq.double_quant:
        return wq.absmax[first:end]
    nested = wq.nested_blocksize
    lead = first % nested
    scales = torch.ops.bitsandbytes.dequantize_blockwise.default(
        wq.absmax[first - lead:end], wq.absmax_scale[(first - lead) // nested:-(-end // nested)], wq.absmax_code,
        nested, torch.float32)
    return scales[lead:] + wq.absmax_offset
