"""The torch.library custom ops of ops.nf4_lora_linear (``nf4_dequantize``, ``nf4_lora_linear_fwd``,
``nf4_lora_linear_bwd``) called directly, on every backend: the decode bit-exact with bitsandbytes'
``dequantize_4bit``, and opcheck (schemas, fake implementations, autograd registration). The public
function ``nf4_lora_linear`` over them: tests/autograd/test_nf4_lora_linear.py."""
import pytest
import torch

from lora_kernels import NF4Weight
from lora_kernels.ops.nf4_lora_linear import nf4_dequantize, nf4_lora_linear_bwd, nf4_lora_linear_fwd
from tests.helpers import make_problem

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
