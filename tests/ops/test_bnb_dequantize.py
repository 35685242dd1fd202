"""bitsandbytes' dequantize kernel as the slab decoder of the large-M NF4 route (``ops.bnb_dequantize``):
its slabs against bitsandbytes' own decode of the whole weight, the rule that picks it, and the route
run with it against the route run with the Triton tiles. On a CPU bitsandbytes' CPU kernels run (its
CUDA kernel where a GPU is present)."""
import copy
import pickle
import sys

import pytest
import torch

import lora_kernels
from lora_kernels import NF4Weight
from lora_kernels.ops import bnb_dequantize, nf4_gemv, triton_launch
from lora_kernels.ops.bnb_dequantize import bnb_dequantize_rows, bnb_rows_quant_type
from lora_kernels.ops.nf4 import NF4Tensors, checked_quant_type
from lora_kernels.ops.triton_launch import is_interpreted
from tests.helpers import assert_close, bnb_dequantized, float_bits, nf4_gemv_inputs, nf4_gemv_reference

pytest.importorskip("bitsandbytes")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_checked_quant_type_knows_only_the_checked_table():
    for quant_type in ("nf4", "fp4"):
        q = NF4Weight.quantize(torch.randn(4, 64), quant_type=quant_type)
        assert checked_quant_type(q.code) == quant_type
        assert checked_quant_type(q.code.clone()) is None  # the same values, not a checked tensor
        for copied in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):  # copies of a checked weight
            assert copied.code is not q.code and checked_quant_type(copied.code) == quant_type
    q = NF4Weight.quantize(torch.randn(4, 64))
    q.code.mul_(1.0)  # written in place: the check no longer holds
    assert checked_quant_type(q.code) is None
    assert checked_quant_type(q.replace_tensors(code=q.code).code) == "nf4"  # checked again
    # copies of a weight whose table was written in place since: the copy's table is checked again
    fp4 = NF4Weight.quantize(torch.randn(4, 64), quant_type="fp4")
    q = NF4Weight.quantize(torch.randn(4, 64))
    q.code.copy_(fp4.code)
    for copied in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert checked_quant_type(copied.code) is None
    # an inference tensor has no version counter: its in-place writes would go unseen
    with torch.inference_mode():
        q = NF4Weight.quantize(torch.randn(4, 64))
    assert q.code.is_inference() and checked_quant_type(q.code) is None


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N,K", [(300, 128), (37, 96)])
def test_row_slabs_equal_bitsandbytes_decode_of_the_whole_weight(quant_type, double_quant, weight_dtype, N, K):
    """Slabs of whole rows from a block boundary (K = 96: rows span blocks; 300 x 128: 600 blocks, so
    slabs start inside a nested block of 256), bit for bit bitsandbytes' dequantize_4bit of the whole
    weight, then cast to the dtype asked for."""
    g = torch.Generator().manual_seed(N + K)
    q = NF4Weight.quantize((torch.randn(N, K, generator=g) + 0.5).to(weight_dtype), double_quant=double_quant,
                           quant_type=quant_type).to(DEVICE)
    wq = NF4Tensors.of(q)
    whole = bnb_dequantized(q)
    slabs = [(0, N), (2, N - 1), (N - 3, N), (6, 6)] + ([(170, 290)] if N > 290 else [])
    for n0, n1 in slabs:
        assert bnb_rows_quant_type(wq, n0, 0, K) == quant_type
        out = bnb_dequantize_rows(wq, n0, n1, quant_type, weight_dtype)
        assert out.shape == (n1 - n0, K) and out.dtype == weight_dtype and out.is_contiguous()
        assert torch.equal(float_bits(out), float_bits(whole[n0:n1])), (n0, n1)
    out = bnb_dequantize_rows(wq, 2, N - 1, quant_type, torch.float32)
    assert out.dtype == torch.float32 and torch.equal(out, whole[2:N - 1].float())


def test_which_slabs_bitsandbytes_decodes(monkeypatch):
    q = NF4Weight.quantize(torch.randn(40, 96))
    wq = NF4Tensors.of(q)
    assert bnb_rows_quant_type(wq, 2, 0, 96) == "nf4"
    assert bnb_rows_quant_type(wq, 1, 0, 96) is None  # 96 % 64: row 1 starts inside a block
    assert bnb_rows_quant_type(wq, 0, 32, 96) is None  # not whole rows (the backward's column slabs)
    assert bnb_rows_quant_type(wq, 0, 0, 64) is None
    assert bnb_rows_quant_type(wq._replace(code=q.code.clone()), 0, 0, 96) is None  # table unknown on the host
    assert bnb_rows_quant_type(wq._replace(nested_blocksize=100), 0, 0, 96) is None
    monkeypatch.delitem(sys.modules, "bitsandbytes")  # not imported by anyone: never imported here
    assert bnb_rows_quant_type(wq, 0, 0, 96) is None


def test_slab_decoder_setting(monkeypatch):
    from types import SimpleNamespace as NS
    q = NF4Weight.quantize(torch.randn(16, 256))

    def wq(device):
        return NF4Tensors.of(q)._replace(packed=NS(device=NS(type=device)))
    monkeypatch.delenv(nf4_gemv.NF4_SLAB_DECODER_ENV, raising=False)  # auto: bitsandbytes' on CUDA only
    assert nf4_gemv.bnb_slab_quant_type(wq("cuda"), 0, 0, 256) == "nf4"
    assert nf4_gemv.bnb_slab_quant_type(wq("cpu"), 0, 0, 256) is None
    assert nf4_gemv.bnb_slab_quant_type(wq("cuda"), 0, 64, 256) is None
    monkeypatch.setenv(nf4_gemv.NF4_SLAB_DECODER_ENV, "bnb")
    assert nf4_gemv.bnb_slab_quant_type(wq("cpu"), 0, 0, 256) == "nf4"
    for other in ("triton", "cuda"):
        monkeypatch.setenv(nf4_gemv.NF4_SLAB_DECODER_ENV, other)
        assert nf4_gemv.bnb_slab_quant_type(wq("cuda"), 0, 0, 256) is None
    monkeypatch.setenv(nf4_gemv.NF4_SLAB_DECODER_ENV, "bitsandbytes")
    with pytest.raises(ValueError, match=nf4_gemv.NF4_SLAB_DECODER_ENV):
        nf4_gemv.bnb_slab_quant_type(wq("cuda"), 0, 0, 256)
    # bitsandbytes imported without its native CUDA library (it then stands in a library that raises
    # when a kernel runs): CUDA slabs stay on our decoders; its CPU ops run without it
    from bitsandbytes import cextension
    monkeypatch.setattr(cextension, "lib", cextension.ErrorHandlerMockBNBNativeLibrary("no libbitsandbytes_cuda"))
    monkeypatch.setenv(nf4_gemv.NF4_SLAB_DECODER_ENV, "bnb")
    assert nf4_gemv.bnb_slab_quant_type(wq("cuda"), 0, 0, 256) is None
    assert nf4_gemv.bnb_slab_quant_type(wq("cpu"), 0, 0, 256) == "nf4"


@pytest.mark.skipif(DEVICE == "cpu" and not is_interpreted(), reason="the Triton route on a CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_large_m_route_with_bitsandbytes_slabs(monkeypatch, quant_type):
    """The slab route decoding its forward slabs with bitsandbytes' kernel gives the outputs and
    gradients of the same route with the Triton tiles, bit for bit (the same decoded values meet the
    same matmuls), and the float64 reference's; the backward's column slabs stay on the Triton tiles."""
    monkeypatch.setenv(triton_launch.NF4_CUBLAS_MIN_M_ENV, "1")
    monkeypatch.setenv(nf4_gemv.NF4_GEMV_ENV, "0")
    calls, scale_decodes = [], []
    real = triton_launch.bnb_dequantize_rows
    monkeypatch.setattr(triton_launch, "bnb_dequantize_rows", lambda *a: (calls.append(a[1:3]), real(*a))[1])
    real_scales = bnb_dequantize._block_scales
    monkeypatch.setattr(bnb_dequantize, "_block_scales",  # the calls that decode double-quantized scales
                        lambda wq, *a: (wq.double_quant and scale_decodes.append(a), real_scales(wq, *a))[1])
    args, q = nf4_gemv_inputs(20, 128, 72, 8, torch.float16, torch.float16, True, device=DEVICE,
                              quant_type=quant_type)
    x, A, B, bias = args[0], args[7], args[8], args[9]
    results = {}
    for decoder in ("triton", "bnb"):
        monkeypatch.setenv(nf4_gemv.NF4_SLAB_DECODER_ENV, decoder)
        xg, Ag, Bg = (t.detach().clone().requires_grad_(True) for t in (x, A, B))
        y = lora_kernels.nf4_lora_linear(xg, q, Ag, Bg, 0.75, bias=bias)
        dy = torch.linspace(-1, 1, y.numel(), device=DEVICE, dtype=y.dtype).view_as(y)
        y.backward(dy)
        results[decoder] = (y, xg.grad, Ag.grad, Bg.grad)
    assert calls and all(n1 - n0 < 72 for n0, n1 in calls)  # slabs, never the whole weight
    assert sum(n1 - n0 for n0, n1 in calls) == 72
    # the double-quantized block scales decoded once for the forward's slabs (one op per slab left)
    assert len(calls) == 2 and scale_decodes == [(0, 72 * 128 // 64)]
    for ours, theirs in zip(results["bnb"], results["triton"]):
        assert torch.equal(ours, theirs)
    y_ref, _ = nf4_gemv_reference(args, q)
    assert_close(results["bnb"][0], y_ref, 3e-3, "y")
    # gradients against float64 autograd on the weight as bitsandbytes decodes it
    xd, Ad, Bd = (t.detach().double().cpu().requires_grad_(True) for t in (x, A, B))
    W = bnb_dequantized(q).to(x.dtype).double().cpu()
    (xd @ W.t() + 0.75 * (xd @ Ad.t()) @ Bd.t() + bias.double().cpu()).backward(dy.double().cpu())
    for got, ref, name in zip(results["bnb"][1:], (xd.grad, Ad.grad, Bd.grad), ("dx", "dA", "dB")):
        assert_close(got.cpu(), ref, 3e-3, name)


@pytest.mark.skipif(DEVICE == "cpu" and not is_interpreted(), reason="the Triton route on a CPU needs TRITON_INTERPRET=1")
def test_bitsandbytes_slabs_are_sized_by_the_stored_dtype(monkeypatch):
    """bitsandbytes' kernel decodes a slab in the weight's stored dtype before the cast to x's: an fp32
    weight with fp16 x gets slabs of half the rows, so that the fp32 slab fits configs.NF4_SLAB_BYTES."""
    monkeypatch.setenv(triton_launch.NF4_CUBLAS_MIN_M_ENV, "1")
    monkeypatch.setenv(nf4_gemv.NF4_GEMV_ENV, "0")
    monkeypatch.setenv(nf4_gemv.NF4_SLAB_DECODER_ENV, "bnb")
    monkeypatch.setattr(triton_launch.configs, "NF4_SLAB_BYTES", 64 << 10)  # 128 fp32 rows of K = 128
    calls = []
    real = triton_launch.bnb_dequantize_rows
    monkeypatch.setattr(triton_launch, "bnb_dequantize_rows", lambda *a: (calls.append(a[1:3]), real(*a))[1])
    for weight_dtype, rows in ((torch.float16, 256), (torch.float32, 128)):
        calls.clear()
        args, q = nf4_gemv_inputs(3, 128, 512, 4, torch.float16, torch.float16, False, device=DEVICE,
                                  weight_dtype=weight_dtype)
        y = lora_kernels.nf4_lora_linear(args[0], q, args[7], args[8], 0.75)
        assert calls == [(n0, n0 + rows) for n0 in range(0, 512, rows)], weight_dtype
        assert_close(y, nf4_gemv_reference(args, q)[0], 3e-3, "y")
