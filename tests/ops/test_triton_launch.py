"""Launcher plumbing of ops.triton_launch: every Triton launch runs with the tensors' CUDA device
current (Triton launches on the current device and stream, whatever device its tensors are on)."""
import contextlib

import pytest
import torch

import lora_kernels
from lora_kernels.ops import lora_linear_reference, triton_launch
from lora_kernels.ops.nf4_lora_linear import nf4_dequantize
from tests.helpers import BOUNDS, GridRecorder, keep_mask_for, rel_err


def test_on_device_selects_the_tensors_cuda_device():
    ctx = triton_launch.on_device(torch.device("cuda", 1))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1  # entering it needs a GPU; building it does not
    assert isinstance(triton_launch.on_device(torch.device("cpu")), contextlib.nullcontext)


def _small_problem(M: int, K: int, N: int, seed: int) -> tuple:
    """x [M, K], weight [N, K], lora_A [4, K], lora_B [N, 4]: random, x and the adapters requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen, requires_grad=True)
    weight = torch.randn(N, K, generator=gen) / K ** 0.5
    A = (torch.randn(4, K, generator=gen) / K ** 0.5).requires_grad_(True)
    B = torch.randn(N, 4, generator=gen).requires_grad_(True)
    return x, weight, A, B


@pytest.mark.skipif(not triton_launch.is_interpreted(), reason="needs TRITON_INTERPRET=1")
def test_every_launcher_runs_on_its_tensors_device(monkeypatch):
    entered = []

    def recording_on_device(device):
        entered.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(triton_launch, "on_device", recording_on_device)
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "triton")
    x, weight, A, B = _small_problem(5, 40, 24, seed=3)
    y = lora_kernels.lora_linear(x, weight, A, B, 0.5)
    y.backward(torch.ones_like(y))
    assert entered == [x.device, x.device]  # forward launcher, backward launcher
    ref = lora_linear_reference(x.double(), weight.double(), A.double(), B.double(), 0.5)
    assert torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-4)

    entered.clear()
    q = lora_kernels.NF4Weight.quantize(weight)
    nf4_dequantize(*q.op_tensors(), q.numel, q.blocksize, q.nested_blocksize, q.dtype)  # the Triton decode
    assert entered == [q.packed.device]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_layer_on_a_second_gpu_while_the_first_is_current():
    # e.g. a model spread over GPUs with device_map="auto": the current device stays cuda:0
    device = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(37, 256, generator=gen).to(device, torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(192, 256, generator=gen) / 16).to(device, torch.bfloat16)
    A = (torch.randn(8, 256, generator=gen) / 16).to(device).requires_grad_(True)
    B = torch.randn(192, 8, generator=gen).to(device).requires_grad_(True)
    y = lora_kernels.lora_linear(x, weight, A, B, 2.0)
    y.float().sum().backward()
    torch.cuda.synchronize(device)
    ref = lora_linear_reference(x.double(), weight.double(), A.double(), B.double(), 2.0)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
    assert x.grad.device == device and torch.isfinite(x.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs an sm_90 GPU")
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("switch", [triton_launch.FUSED_MIN_M_ENV, triton_launch.TMA_MIN_M_ENV])
def test_forward_variant_on_cuda_matches_the_default_forward(monkeypatch, adapter_dtype, switch):
    # The one-launch forward and the TMA GEMM compiled for the GPU (the interpreter tests cover their
    # logic): same y, h (through dB) and gradients as the default forward, and close to float64.
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(8)
    M, K, N, r = 1000, 512, 1304, 16  # rows of x, dY and W 16-byte aligned (TMA), partial tiles
    x = torch.randn(M, K, generator=gen).to(device, torch.bfloat16)
    weight = (torch.randn(N, K, generator=gen) / 23).to(device, torch.bfloat16)
    A0 = (torch.randn(r, K, generator=gen) / 23).to(device, adapter_dtype)
    B0 = torch.randn(N, r, generator=gen).to(device, adapter_dtype)
    bias = torch.randn(N, generator=gen).to(device, torch.bfloat16)
    kernels = {triton_launch.FUSED_MIN_M_ENV: ["lora_forward_fused_kernel"],
               triton_launch.TMA_MIN_M_ENV: ["lora_forward_gemm_tma_kernel", "lora_grad_input_tma_kernel"]}[switch]
    recorders = [GridRecorder(getattr(triton_launch, name)) for name in kernels]
    for name, recorder in zip(kernels, recorders):
        monkeypatch.setattr(triton_launch, name, recorder)
    # float64 reference with the same dropout mask (the seed drawn after torch.manual_seed(5))
    keep = keep_mask_for(5, M, K, 0.1, device=device)
    ref_leaves = [t.double().requires_grad_(True) for t in (x, A0, B0)]
    ref = lora_linear_reference(ref_leaves[0], weight.double(), ref_leaves[1], ref_leaves[2], 2.0,
                                bias=bias.double(), keep_mask=keep, dropout_p=0.1)
    ref.square().sum().backward()
    expected = (ref, *(leaf.grad for leaf in ref_leaves))
    results = {}
    for min_m in ("0", "1"):
        monkeypatch.setenv(switch, min_m)
        xs, A, B = x.clone().requires_grad_(True), A0.clone().requires_grad_(True), B0.clone().requires_grad_(True)
        torch.manual_seed(5)
        y = lora_kernels.lora_linear(xs, weight, A, B, 2.0, bias=bias, dropout_p=0.1)
        y.float().square().sum().backward()
        results[min_m] = (y.float(), xs.grad.float(), A.grad.float(), B.grad.float())
        assert [len(rec.grids) for rec in recorders] == [int(min_m)] * len(kernels)  # each ran once when on
        for name, got, want in zip(("y", "dx", "dA", "dB"), results[min_m], expected):
            assert rel_err(got, want) < BOUNDS[torch.bfloat16], f"{name}, {switch}={min_m}"
    for two, one in zip(results["0"], results["1"]):
        assert ((one - two).norm() / two.norm()).item() < 2e-2


@pytest.mark.parametrize("K,blocksize,aligned", [(128, 64, True), (4096, 64, True), (96, 64, False),
                                                  (37, 64, False), (128, 32, False)])
def test_nf4_gemm_config_follows_weight_alignment(K, blocksize, aligned):
    # the tile decode needs K % blocksize == 0 and tiles inside a block; other weights take the per-element
    # decode's own tiles (at the aligned tiles it would need more shared memory than sm_90 has)
    from lora_kernels.kernels import configs
    absmax = torch.empty(0, dtype=torch.uint8)  # (double quantization)
    wq = triton_launch.NF4Tensors(None, absmax, *(None,) * 4, 40, K, blocksize, 256, torch.bfloat16)
    for fn in (configs.forward_gemm_config, configs.grad_input_config, configs.fused_forward_config):
        cfg = triton_launch._gemm_config(fn, wq, 16, "half", 90)
        assert cfg == fn(16, "half", 90, "nf4", nf4_aligned=aligned), fn.__name__
        # the kernels decode by tiles wherever the chosen tiles allow it (32-blocks: the 32-wide steps do)
        assert triton_launch._weight_args(wq, cfg.blocks["BLOCK_K"])[1]["NF4_ALIGNED"] == \
            (K % blocksize == 0 and blocksize % cfg.blocks["BLOCK_K"] == 0)
    assert triton_launch._gemm_config(configs.forward_gemm_config, None, 16, "half", 90) == \
        configs.forward_gemm_config(16, "half", 90, "dense")


def test_host_cdiv_is_ceiling_division():
    import math
    assert [triton_launch.cdiv(a, b) for a, b in ((0, 64), (1, 64), (64, 64), (65, 64), (8192, 128))] == [0, 1, 1, 2, 64]
    assert all(triton_launch.cdiv(a, b) == math.ceil(a / b) for a in range(0, 300, 7) for b in (1, 16, 33))


# The kernels whose first argument is x or dY, read in tiles along its last dimension.
ROW_INPUT_KERNELS = ("lora_shrink_kernel", "lora_forward_gemm_kernel", "lora_grad_out_pass_kernel",
                     "lora_grad_input_kernel", "lora_grad_a_kernel")


@pytest.mark.skipif(not triton_launch.is_interpreted(), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("qlora", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("layout", ["transposed", "k_step"])
def test_x_and_dy_reach_the_kernels_with_unit_inner_stride(monkeypatch, layout, qlora):
    """x (forward, dA) and dY (dH/dB, dX) whose last dimension is not contiguous (a transposed view, a
    slice with a step) are copied once before the kernels, which spill with such strides; results as
    for contiguous inputs."""
    launched = []
    real_launch = triton_launch.launch

    def recording_launch(kernel, grid, *args, **kwargs):
        if kernel.__name__ in ROW_INPUT_KERNELS:
            launched.append((kernel.__name__, args[0].stride(1), args[0].shape))
        return real_launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(triton_launch, "launch", recording_launch)
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "triton")
    monkeypatch.setenv(triton_launch.NF4_CUBLAS_MIN_M_ENV, "0")  # the fused NF4 GEMMs, which spill most
    gen = torch.Generator().manual_seed(6)
    M, K, N, r = 33, 64, 40, 4

    def strided(rows, cols):
        if layout == "transposed":
            return torch.randn(cols, rows, generator=gen).t()
        return torch.randn(rows, 2 * cols, generator=gen)[:, ::2]

    x = strided(M, K).requires_grad_(True)
    dy = strided(M, N)
    assert x.stride(1) != 1 and dy.stride(1) != 1
    weight = torch.randn(N, K, generator=gen) / 8
    A = (torch.randn(r, K, generator=gen) / 8).requires_grad_(True)
    B = torch.randn(N, r, generator=gen).requires_grad_(True)
    if qlora:
        q = lora_kernels.NF4Weight.quantize(weight)
        y = lora_kernels.nf4_lora_linear(x, q, A, B, 0.5)
        weight = q.dequantize()
    else:
        y = lora_kernels.lora_linear(x, weight, A, B, 0.5)
    y.backward(dy)
    assert {name for name, _, _ in launched} == set(ROW_INPUT_KERNELS)
    assert all(stride == 1 for _, stride, _ in launched), launched
    leaves = [t.detach().double().requires_grad_(True) for t in (x, A, B)]
    ref = lora_linear_reference(leaves[0], weight.double(), leaves[1], leaves[2], 0.5)
    ref.backward(dy.double())
    for out, expected in zip((y, x.grad, A.grad, B.grad), (ref, *(t.grad for t in leaves))):
        assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-5


@pytest.mark.skipif(not triton_launch.is_interpreted(), reason="needs TRITON_INTERPRET=1")
def test_every_launch_states_fma_contraction(monkeypatch):
    # Left unset, Triton's default decides (3.9 warns, 3.10 turns it off): dense kernels ask for it on,
    # every kernel decoding NF4 for it off (bit-exact scale decode).
    # Every launch under the interpreter calls a GridExecutor (triton 3.4 to 3.9; 3.4's
    # InterpretedFunction has no run method to spy on) with the launch's keyword arguments.
    from triton.runtime.interpreter import GridExecutor
    launched = []
    call = GridExecutor.__call__

    def recording_call(executor, *args, **kwargs):
        name = executor.fn.__name__
        launched.append((name, kwargs.get("W_NF4", "nf4" in name), kwargs.get("enable_fp_fusion")))
        return call(executor, *args, **kwargs)

    monkeypatch.setattr(GridExecutor, "__call__", recording_call)
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "triton")
    x, weight, A, B = _small_problem(6, 64, 32, seed=4)
    lora_kernels.lora_linear(x, weight, A, B, 0.5, dropout_p=0.25).sum().backward()
    q = lora_kernels.NF4Weight.quantize(weight)
    lora_kernels.nf4_lora_linear(x, q, A, B, 0.5).sum().backward()
    for w in (weight, weight[:5, :39]):  # numel % 64 == 0: the tile decode; else per element
        q = lora_kernels.NF4Weight.quantize(w.contiguous())
        nf4_dequantize(*q.op_tensors(), q.numel, q.blocksize, q.nested_blocksize, q.dtype)
    kernels = {name for name, _, _ in launched}
    assert {"lora_shrink_kernel", "lora_forward_gemm_kernel", "lora_grad_out_pass_kernel", "lora_grad_input_kernel",
            "lora_grad_a_kernel", "nf4_dequantize_kernel", "nf4_dequantize_tiles_kernel"} <= kernels
    assert {nf4 for _, nf4, _ in launched} == {True, False}
    for name, nf4, fusion in launched:
        assert fusion is (not nf4), (name, nf4, fusion)
