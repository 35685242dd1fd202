"""The torch.library custom ops of ops.nf4_lora_linear (``nf4_dequantize``, ``nf4_lora_linear_fwd``,
``nf4_lora_linear_bwd``) called directly, on every backend: the decode bit-exact with bitsandbytes'
``dequantize_4bit`` (every block size; nested block sizes other than 256), and opcheck (schemas, fake
implementations, autograd registration). The public function ``nf4_lora_linear`` over them:
tests/autograd/test_nf4_lora_linear.py."""
import pytest
import torch

from lora_kernels import NF4Weight
from lora_kernels.ops.nf4 import SUPPORTED_BLOCKSIZES
from lora_kernels.ops.nf4_lora_linear import nf4_dequantize, nf4_lora_linear_bwd, nf4_lora_linear_fwd
from tests.helpers import bnb_dequantized, make_problem

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

pytestmark = pytest.mark.usefixtures("poisoned")


@pytest.mark.parametrize("shape", [(1, 1), (3, 67), (10, 64), (129,), (2, 3, 45)])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_op_is_bit_exact_with_bitsandbytes(backend, shape, dtype, double_quant):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(shape, generator=torch.Generator().manual_seed(11)).to(dtype) * 3
    # Both quantized on the CPU (where the bytes are known to agree), then decoded on the backend's
    # device: bnb's kernel there against ours.
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    q = NF4Weight.quantize(w, double_quant=double_quant).to(backend.device)
    packed = packed.to(backend.device)
    state.to(backend.device)  # QuantState.to moves its tensors in place
    expected = bnb_f.dequantize_4bit(packed, state)
    out = nf4_dequantize(*q.op_tensors(), q.numel, q.blocksize, q.nested_blocksize, q.dtype)
    assert torch.equal(out.view(shape), expected)


@pytest.mark.parametrize("blocksize", [b for b in SUPPORTED_BLOCKSIZES if b != 64])
def test_dequantize_op_block_sizes_bit_exact_with_bitsandbytes(backend, blocksize):
    """Every other block size bitsandbytes quantizes with: a weight of whole blocks (decoded as rows of
    one block each by the tile decode) and one whose last block is partial (the per-element decode),
    each with several blocks, with and without double quantization."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    for shape, dtype, double_quant in (((8, 1024), BF16, True), ((3, 4100), F16, False)):
        w = torch.randn(shape, generator=torch.Generator().manual_seed(blocksize)).to(dtype) * 3
        packed, state = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
        q = NF4Weight.quantize(w, blocksize=blocksize, double_quant=double_quant).to(backend.device)
        assert q.n_blocks > 1 and (q.numel % blocksize == 0) == (shape[1] == 1024)
        packed = packed.to(backend.device)
        state.to(backend.device)
        expected = bnb_f.dequantize_4bit(packed, state)
        out = nf4_dequantize(*q.op_tensors(), q.numel, q.blocksize, q.nested_blocksize, q.dtype)
        assert torch.equal(out.view(shape), expected.view(shape)), shape


@pytest.mark.parametrize("nested_blocksize", [4, 100])
def test_dequantize_op_nested_block_sizes(backend, nested_blocksize):
    """Second-level blocks of 4 and of 100 (not a power of two) absmax values instead of quantize_4bit's
    256, as a QuantState or a state dict may hold: bit-exact with bitsandbytes' decode of the same weight."""
    for shape, blocksize in (((16, 256), 32), ((7, 1001), 32)):  # the tile decode, the per-element decode
        w = torch.randn(shape, generator=torch.Generator().manual_seed(nested_blocksize))
        q = NF4Weight.quantize(w, blocksize, nested_blocksize=nested_blocksize)
        assert q.nested_blocksize == nested_blocksize and q.absmax_scale.numel() > 1
        expected = bnb_dequantized(q)
        q = q.to(backend.device)
        out = nf4_dequantize(*q.op_tensors(), q.numel, q.blocksize, q.nested_blocksize, q.dtype)
        assert torch.equal(out.view(shape).cpu(), expected), shape


@pytest.mark.parametrize("double_quant", [True, False])
def test_opcheck(backend, double_quant):
    pb = make_problem((6,), 70, 12, 3, F32, bias=True, seed=16, nf4=dict(double_quant=double_quant))
    q = pb.qweight
    wt = q.op_tensors()
    meta = (q.blocksize, q.nested_blocksize, q.dtype)
    x = pb.x.detach().requires_grad_(True)
    A, B = pb.lora_A.detach().requires_grad_(True), pb.lora_B.detach().requires_grad_(True)
    torch.library.opcheck(nf4_lora_linear_fwd, (x, *wt, A, B, pb.bias.detach(), 1.5, 0.0, None, *meta))
    y, h = nf4_lora_linear_fwd(x.detach(), *wt, A.detach(), B.detach(), None, 1.5, 0.0, None, *meta)
    dy = torch.randn_like(y)
    torch.library.opcheck(nf4_lora_linear_bwd, (dy, x.detach(), *wt, A.detach(), B.detach(), h, None, 1.5, 0.0,
                                                True, True, True, True, *meta))
    torch.library.opcheck(nf4_dequantize, (*wt, q.numel, *meta))
