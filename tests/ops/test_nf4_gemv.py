"""``lora_kernels::nf4_gemv_lora`` (csrc/ CUDA decode GEMV): schema, fake and CPU spec on CPU; the CUDA
kernel against the float64 reference where a GPU and the built extension exist."""

import pytest
import torch

import lora_kernels
from lora_kernels import NF4Weight
from lora_kernels.ops import nf4_gemv
from lora_kernels.ops.nf4 import NF4Tensors
from tests.helpers import (assert_close, bnb_dequantized, nf4_gemv_inputs, nf4_gemv_reference, nf4_grad_input_args,
                           nf4_grad_input_reference, nf4_slab_args, nf4_weights_of_each_stored_dtype)

OP = torch.ops.lora_kernels.nf4_gemv_lora.default


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("double_quant", [False, True])
def test_cpu_spec_matchesnf4_gemv_reference(bias, double_quant):
    args, q = nf4_gemv_inputs(5, 100, 37, 8, torch.float32, torch.float32, bias, double_quant)
    y, h = OP(*args)
    y_ref, h_ref = nf4_gemv_reference(args, q)
    assert y.shape == (5, 37) and h.shape == (5, 8)
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(h, h_ref, 1e-5, "h")


@pytest.mark.parametrize("kernel", [0, 1])
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck(bias, kernel):
    args, _ = nf4_gemv_inputs(3, 64, 16, 4, torch.float32, torch.float32, bias)
    torch.library.opcheck(OP, (*args, kernel))


def test_cpu_spec_rejects_an_unknown_kernel():
    args, _ = nf4_gemv_inputs(2, 64, 8, 4, torch.float32, torch.float32, False)
    with pytest.raises(ValueError, match="kernel must be 0"):
        OP(*args, 2)


def test_shared_memory_constant_matches_the_kernel():
    """MMA_SHARED_BYTES (the eligibility rule) is mma_smem_bytes(2) of csrc/nf4_gemv_mma_kernel.cuh, computed
    from the constexpr layout constants of the sources (a drifted constant would send calls to a
    kernel that refuses them)."""
    import pathlib
    import re
    csrc = pathlib.Path(__file__).resolve().parents[2] / "csrc"
    names = {}
    for source in ("nf4_device.cuh", "nf4_gemv_mma_kernel.cuh"):
        for name, expr in re.findall(r"^constexpr int (k\w+) = ([^;]+);", (csrc / source).read_text(), re.M):
            names[name] = eval(expr, {}, dict(names))  # integer arithmetic on earlier constants
    assert names["kStagesOffset"] + names["kMmaWarps"] * 2 * names["kStageBytes"] == nf4_gemv.MMA_SHARED_BYTES
    assert names["kMaxRank"] == nf4_gemv.GEMV_MAX_RANK


def test_requested_kernel_from_the_environment(monkeypatch):
    monkeypatch.delenv(nf4_gemv.NF4_GEMV_KERNEL_ENV, raising=False)
    assert nf4_gemv.requested_gemv_kernel() == nf4_gemv.DEFAULT_GEMV_KERNEL == "simt"
    monkeypatch.setenv(nf4_gemv.NF4_GEMV_KERNEL_ENV, "mma")
    assert nf4_gemv.requested_gemv_kernel() == "mma"
    monkeypatch.setenv(nf4_gemv.NF4_GEMV_KERNEL_ENV, "wgmma")
    with pytest.raises(ValueError, match=nf4_gemv.NF4_GEMV_KERNEL_ENV):
        nf4_gemv.requested_gemv_kernel()


def test_tensor_core_kernel_eligibility_with_stand_ins(monkeypatch):
    """The documented rule (K % 256, blocksize 64, nested block size, alignment, device), with a
    stand-in for the device properties (no GPU here)."""
    from types import SimpleNamespace as NS
    big = NS(major=9, shared_memory_per_block_optin=232448)
    monkeypatch.setattr(nf4_gemv, "_device_properties", lambda device: big)
    q = NF4Weight.quantize(torch.randn(16, 512), double_quant=True)

    def wq(q=q, K=512, blocksize=None, nested=None):
        return NF4Tensors(*q.op_tensors(), 16, K, blocksize or q.blocksize, nested or q.nested_blocksize, q.dtype)
    x = torch.randn(3, 512)
    assert nf4_gemv.mma_eligible(x, wq())
    assert nf4_gemv.gemv_kernel(x, wq(), "mma") == "mma"
    assert nf4_gemv.gemv_kernel(x, wq(), "simt") == "simt"
    with pytest.raises(ValueError, match="kernel must be one of"):
        nf4_gemv.gemv_kernel(x, wq(), "tensor")
    monkeypatch.setenv(nf4_gemv.NF4_GEMV_KERNEL_ENV, "mma")
    assert nf4_gemv.gemv_kernel(x, wq()) == "mma"  # the requested kernel when eligible
    x_odd = torch.randn(3, 320)  # K % 256 != 0: one pass would straddle rows
    assert not nf4_gemv.mma_eligible(x_odd, wq(K=320))
    assert nf4_gemv.gemv_kernel(x_odd, wq(K=320)) == "simt"  # falls back
    assert not nf4_gemv.mma_eligible(x, wq(blocksize=128))
    assert not nf4_gemv.mma_eligible(x, wq(nested=2))
    q32 = NF4Weight.quantize(torch.randn(16, 512), double_quant=False)  # fp32 absmax: no nested rule
    assert nf4_gemv.mma_eligible(x, wq(q32, nested=2))
    misaligned = NF4Tensors(q.packed[1:], *q.op_tensors()[1:], 16, 512, 64, q.nested_blocksize, q.dtype)
    assert not nf4_gemv.mma_eligible(x, misaligned)  # packed codes not 8-byte aligned
    for props in (NS(major=7, shared_memory_per_block_optin=232448),  # no bf16 mma.sync / cp.async
                  NS(major=8, shared_memory_per_block_optin=101376)):  # sm_86/89: too little shared memory
        monkeypatch.setattr(nf4_gemv, "_device_properties", lambda device, p=props: p)
        assert not nf4_gemv.mma_eligible(x, wq())


def test_dispatch_rule(monkeypatch):
    x = torch.randn(2, 64)
    q = NF4Weight.quantize(torch.randn(8, 64))
    wq = NF4Tensors(*q.op_tensors(), 8, 64, q.blocksize, q.nested_blocksize, q.dtype)
    assert not nf4_gemv.use_cuda_gemv(x, torch.randn(2, 64), 0.0, None, wq)  # CPU tensors never
    monkeypatch.delenv(nf4_gemv.NF4_GEMV_ENV, raising=False)
    assert nf4_gemv.cuda_gemv_max_m() == nf4_gemv.DEFAULT_GEMV_MAX_M
    monkeypatch.setenv(nf4_gemv.NF4_GEMV_ENV, "32")
    assert nf4_gemv.cuda_gemv_max_m() == 32  # above 16 rows: one launch per 16
    monkeypatch.setenv(nf4_gemv.NF4_GEMV_ENV, "1000")
    assert nf4_gemv.cuda_gemv_max_m() == nf4_gemv.GEMV_CHUNKED_MAX_M == 64
    for bad in ("-1", "x"):
        monkeypatch.setenv(nf4_gemv.NF4_GEMV_ENV, bad)
        with pytest.raises(ValueError, match=nf4_gemv.NF4_GEMV_ENV):
            nf4_gemv.cuda_gemv_max_m()


def test_eligibility_rule_with_cuda_stand_ins(monkeypatch):
    """The rule itself, with stand-ins for CUDA tensors and a loaded extension (no GPU here)."""
    from types import SimpleNamespace as NS
    monkeypatch.setattr(nf4_gemv, "extension_runs_on", lambda device: True)
    monkeypatch.setenv(nf4_gemv.NF4_GEMV_ENV, "16")
    cuda = NS(type="cuda")

    def x(M=4, dtype=torch.bfloat16):
        return NS(shape=(M, 4096), device=cuda, dtype=dtype)
    A = NS(shape=(16, 4096))
    q = NF4Weight.quantize(torch.randn(8, 64), double_quant=True)
    wq = NS(blocksize=q.blocksize, nested_blocksize=q.nested_blocksize, absmax_code=q.absmax_code)
    assert nf4_gemv.use_cuda_gemv(x(), A, 0.0, None, wq)
    assert nf4_gemv.use_cuda_gemv(x(16, torch.float16), A, 0.1, None, wq)  # dropout_p without a seed: eval
    assert not nf4_gemv.use_cuda_gemv(x(17), A, 0.0, None, wq)  # M above the limit
    assert not nf4_gemv.use_cuda_gemv(x(0), A, 0.0, None, wq)
    assert not nf4_gemv.use_cuda_gemv(x(dtype=torch.float32), A, 0.0, None, wq)
    assert not nf4_gemv.use_cuda_gemv(x(), A, 0.1, torch.zeros(1), wq)  # training dropout
    assert not nf4_gemv.use_cuda_gemv(x(), NS(shape=(65, 4096)), 0.0, None, wq)  # rank above 64
    # block indices are shifts: a nested block size that is not a power of two stays on Triton
    assert not nf4_gemv.use_cuda_gemv(x(), A, 0.0, None, NS(blocksize=64, nested_blocksize=100, absmax_code=1))
    assert nf4_gemv.use_cuda_gemv(x(), A, 0.0, None, NS(blocksize=64, nested_blocksize=100, absmax_code=None))
    monkeypatch.setenv(nf4_gemv.NF4_GEMV_ENV, "0")  # off
    assert not nf4_gemv.use_cuda_gemv(x(1), A, 0.0, None, wq)


@pytest.mark.parametrize("M", [16, 17, 40])
def test_more_than_16_rows_run_one_launch_per_16(monkeypatch, M):
    """cuda_gemv_forward splits M > 16 into launches of at most 16 rows (the op's CPU spec stands in
    for the kernel here) and stitches y and h back in order."""
    args, q = nf4_gemv_inputs(M, 128, 24, 4, torch.float32, torch.float32, True)
    rows = []
    real = nf4_gemv.torch.ops.lora_kernels.nf4_gemv_lora

    def spy(x, *rest):
        rows.append(x.shape[0])
        return real(x, *rest)
    monkeypatch.setattr(nf4_gemv.torch.ops.lora_kernels, "nf4_gemv_lora", spy)
    x, A, B, b, scale = args[0], args[7], args[8], args[9], args[10]
    y, h = nf4_gemv.cuda_gemv_forward(x, NF4Tensors.of(q), A, B, b, scale)
    assert rows == [16] * (M // 16) + ([M % 16] if M % 16 else [])
    y_ref, h_ref = nf4_gemv_reference(args, q)
    assert y.shape == (M, 24) and h.shape == (M, 4)
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(h, h_ref, 1e-5, "h")


SLAB_OP = torch.ops.lora_kernels.nf4_dequantize_slab.default


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_slab_decode_spec_is_bit_exact(double_quant, out_dtype):
    q = NF4Weight.quantize(torch.randn(40, 192, generator=torch.Generator().manual_seed(3)), double_quant=double_quant)
    W = bnb_dequantized(q).to(out_dtype)  # bitsandbytes' own decode when installed
    for n0, n1, k0, k1 in ((0, 40, 0, 192), (5, 29, 64, 128), (7, 8, 0, 8), (3, 3, 0, 64)):
        out = SLAB_OP(*nf4_slab_args(q, n0, n1, k0, k1, out_dtype))
        assert out.dtype == out_dtype and out.shape == (n1 - n0, k1 - k0) and out.is_contiguous()
        assert torch.equal(out, W[n0:n1, k0:k1])
    torch.library.opcheck(SLAB_OP, nf4_slab_args(q, 5, 29, 64, 128, out_dtype))


def test_cuda_slab_decoder_rule_with_stand_ins(monkeypatch):
    from types import SimpleNamespace as NS
    monkeypatch.setattr(nf4_gemv, "extension_runs_on", lambda device: True)
    q = NF4Weight.quantize(torch.randn(16, 256), double_quant=True)

    def wq(K=256, blocksize=64, nested=256, ptr=1024, device="cuda"):
        packed = NS(device=NS(type=device), data_ptr=lambda: ptr)
        return NF4Tensors(packed, *q.op_tensors()[1:], 16, K, blocksize, nested, q.dtype)
    monkeypatch.delenv(nf4_gemv.NF4_SLAB_DECODER_ENV, raising=False)
    assert not nf4_gemv.use_cuda_slab_decode(wq(), 0, 256)  # the default: the Triton tiles
    monkeypatch.setenv(nf4_gemv.NF4_SLAB_DECODER_ENV, "cuda")
    assert nf4_gemv.use_cuda_slab_decode(wq(), 0, 256)
    assert nf4_gemv.use_cuda_slab_decode(wq(), 64, 128)
    assert not nf4_gemv.use_cuda_slab_decode(wq(device="cpu"), 0, 256)
    assert not nf4_gemv.use_cuda_slab_decode(wq(K=252), 0, 252)  # K % 8
    assert not nf4_gemv.use_cuda_slab_decode(wq(), 4, 128)  # k_start % 8
    assert not nf4_gemv.use_cuda_slab_decode(wq(), 0, 100)  # width % 8
    assert not nf4_gemv.use_cuda_slab_decode(wq(blocksize=96), 0, 256)
    assert not nf4_gemv.use_cuda_slab_decode(wq(nested=100), 0, 256)
    assert not nf4_gemv.use_cuda_slab_decode(wq(ptr=1026), 0, 256)  # codes not 4-byte aligned
    monkeypatch.setenv(nf4_gemv.NF4_SLAB_DECODER_ENV, "cutlass")
    with pytest.raises(ValueError, match=nf4_gemv.NF4_SLAB_DECODER_ENV):
        nf4_gemv.use_cuda_slab_decode(wq(), 0, 256)


GRAD_OP = torch.ops.lora_kernels.nf4_grad_input.default


@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_input_spec_matches_reference(init, dtype):
    args, q = nf4_grad_input_args(5, 70, 96, dtype, init, seed=2)
    dx = GRAD_OP(*args)
    assert dx.dtype == dtype and dx.shape == (5, 96)
    assert_close(dx, nf4_grad_input_reference(args, q), 1e-5 if dtype == torch.float32 else 1.5e-2, "dx")
    torch.library.opcheck(GRAD_OP, args)


def test_cuda_grad_input_rule_with_stand_ins(monkeypatch):
    from types import SimpleNamespace as NS
    monkeypatch.setattr(nf4_gemv, "extension_runs_on", lambda device: True)
    q = NF4Weight.quantize(torch.randn(16, 256), double_quant=True)

    def wq(K=256, blocksize=64, nested=256, ptr=1024):
        return NF4Tensors(NS(data_ptr=lambda: ptr), *q.op_tensors()[1:], 16, K, blocksize, nested, q.dtype)

    def dy(M=4, device="cuda", stride=1):
        return NS(shape=(M, 16), device=NS(type=device), stride=lambda d: stride if d == 1 else 16)
    monkeypatch.delenv(nf4_gemv.NF4_GRAD_INPUT_ENV, raising=False)
    assert not nf4_gemv.use_cuda_grad_input(dy(), wq())  # the default: off until a GPU measures it
    monkeypatch.setenv(nf4_gemv.NF4_GRAD_INPUT_ENV, "16")
    assert nf4_gemv.use_cuda_grad_input(dy(), wq())
    assert nf4_gemv.use_cuda_grad_input(dy(M=16), wq())
    assert not nf4_gemv.use_cuda_grad_input(dy(M=17), wq())
    assert not nf4_gemv.use_cuda_grad_input(dy(M=0), wq())
    assert not nf4_gemv.use_cuda_grad_input(dy(device="cpu"), wq())
    assert not nf4_gemv.use_cuda_grad_input(dy(stride=2), wq())
    assert not nf4_gemv.use_cuda_grad_input(dy(), wq(K=252))  # K % 8
    assert not nf4_gemv.use_cuda_grad_input(dy(), wq(blocksize=96))
    assert not nf4_gemv.use_cuda_grad_input(dy(), wq(nested=100))
    assert not nf4_gemv.use_cuda_grad_input(dy(), wq(ptr=1026))  # codes not 4-byte aligned
    monkeypatch.setenv(nf4_gemv.NF4_GRAD_INPUT_ENV, "1000")
    assert nf4_gemv.cuda_grad_input_max_m() == nf4_gemv.GEMV_CHUNKED_MAX_M  # the kernel takes up to 64 rows


def test_built_architectures_decide_which_gpus_run_the_extension():
    archs = nf4_gemv.parse_cuda_archs("80_90")
    assert archs == ((8, 0, ""), (9, 0, ""))
    assert [nf4_gemv.built_for(archs, cc) for cc in ((8, 0), (8, 6), (8, 9), (9, 0))] == [True] * 4
    # SASS never crosses a major version, and no PTX is built: V100/T4, B200, RTX 50xx stay on Triton
    assert [nf4_gemv.built_for(archs, cc) for cc in ((7, 0), (7, 5), (10, 0), (12, 0))] == [False] * 4
    assert not nf4_gemv.built_for(nf4_gemv.parse_cuda_archs("86"), (8, 0))  # a newer minor than the GPU
    hopper_only = nf4_gemv.parse_cuda_archs("90a_100")
    assert hopper_only == ((9, 0, "a"), (10, 0, ""))
    assert nf4_gemv.built_for(hopper_only, (9, 0)) and nf4_gemv.built_for(hopper_only, (10, 3))
    assert not nf4_gemv.built_for(nf4_gemv.parse_cuda_archs("90a"), (9, 1))  # arch-specific: its GPU only
    for bad in ("", "9", "sm90", "80__90"):
        with pytest.raises(ValueError, match="cuda_archs"):
            nf4_gemv.parse_cuda_archs(bad)


def test_extension_built_for_another_gpu_leaves_the_triton_path(monkeypatch):
    """A loaded extension built for other GPUs (its cuda_archs) is never launched on this one: a
    warning, once per device, and the Triton path; one built for it is."""
    import sys
    from types import SimpleNamespace as NS

    import lora_kernels

    def fake_extension(module):
        # `import lora_kernels._C as ext` reads the package's attribute once a real build was imported
        # (a built tree), sys.modules otherwise: replace both
        monkeypatch.setitem(sys.modules, "lora_kernels._C", module)
        monkeypatch.setattr(lora_kernels, "_C", module, raising=False)

    monkeypatch.setattr(nf4_gemv, "load_extension", lambda: True)
    fake_extension(NS(cuda_archs="80_90"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: {0: (9, 0), 1: (7, 5)}[index])
    nf4_gemv._extension_runs_on.cache_clear()
    try:
        assert nf4_gemv.extension_runs_on(torch.device("cuda", 0))
        with pytest.warns(UserWarning, match="built for sm_80, sm_90, not for this GPU .sm_75."):
            assert not nf4_gemv.extension_runs_on(torch.device("cuda", 1))
        assert not nf4_gemv.extension_runs_on(torch.device("cuda", 1))  # cached: no second warning
        fake_extension(NS())  # an old build that does not say
        nf4_gemv._extension_runs_on.cache_clear()
        with pytest.warns(UserWarning, match="does not say which GPUs"):
            assert not nf4_gemv.extension_runs_on(torch.device("cuda", 0))
    finally:
        nf4_gemv._extension_runs_on.cache_clear()


def test_gemv_rule_needs_blocks_of_at_least_32():
    # the kernel steps a warp's 32 values through one block; the op rejects smaller ones
    from types import SimpleNamespace as NS
    x = NS(shape=(1, 4096), dtype=torch.bfloat16)
    A = NS(shape=(8, 4096))
    assert nf4_gemv.gemv_eligible(x, A, 0.0, None, NS(blocksize=32, nested_blocksize=256, absmax_code=None))
    assert not nf4_gemv.gemv_eligible(x, A, 0.0, None, NS(blocksize=16, nested_blocksize=256, absmax_code=None))


def test_missing_extension_is_silent(recwarn):
    nf4_gemv.load_extension.cache_clear()
    try:
        import lora_kernels._C  # noqa: F401
        has_ext = True
    except ImportError:
        has_ext = False
    assert nf4_gemv.load_extension() == has_ext
    assert not [w for w in recwarn if "_C" in str(w.message)] or has_ext


@pytest.mark.skipif(not nf4_gemv.load_extension(), reason="lora_kernels._C is not built")
def test_extension_registers_the_cuda_kernel_for_the_declared_schema():
    # Runs wherever the extension is built, GPU or not (a CUDA torch loads without a driver):
    # bindings.cpp registers its function under the schema declared in Python; a C++ signature that
    # did not match the schema would have failed the import.
    for qualname in ("lora_kernels::nf4_gemv_lora", "lora_kernels::nf4_dequantize_slab", "lora_kernels::nf4_grad_input"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA")
        assert "bindings.cpp" in torch._C._dispatch_dump(qualname).split("CUDA:")[1].splitlines()[0]
    import lora_kernels._C as ext
    assert nf4_gemv.parse_cuda_archs(ext.cuda_archs)  # what the build says it targets (build_flags.archs_define)


needs_gpu_ext = pytest.mark.skipif(not torch.cuda.is_available() or not nf4_gemv.load_extension(),
                                   reason="needs a GPU and the built lora_kernels._C extension")


def _check_cuda_kernel(kernel, args, q, N, label):
    """Runs the op with ``kernel`` on poisoned memory and compares with the float64 reference."""
    x, A = args[0], args[7]
    assert nf4_gemv.gemv_kernel(x, NF4Tensors.of(q), kernel) == kernel  # eligible: it really runs
    poison = torch.full((x.shape[0], N), float("nan"), device="cuda", dtype=x.dtype)
    del poison  # the op's output reuses this block from the caching allocator: NaN unless written
    y, h = OP(*args, nf4_gemv.GEMV_KERNELS.index(kernel))
    y_ref, h_ref = nf4_gemv_reference(args, q)
    bound = 3e-3 if x.dtype == torch.float16 else 1.5e-2
    assert y.dtype == x.dtype and h.dtype == A.dtype
    assert_close(y, y_ref, bound, f"y {kernel} {label}")
    if A.shape[0]:
        assert_close(h, h_ref, bound, f"h {kernel} {label}")


@needs_gpu_ext
@pytest.mark.parametrize("kernel", nf4_gemv.GEMV_KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("K", [4096, 4000 + 7])  # simt: vector path, element path (K % 32 != 0)
@pytest.mark.parametrize("r", [8, 16, 64])
def test_cuda_kernel_matchesnf4_gemv_reference(kernel, dtype, M, K, r):
    if kernel == "mma" and K % nf4_gemv.MMA_K_MULTIPLE:
        pytest.skip("the tensor-core kernel needs K % 256 == 0 (the rule is tested on CPU)")
    # the last two: a stored dtype other than x's (decode rounds to it, then to x's dtype)
    for bias, dq, adapter_dtype, weight_dtype in ((False, True, dtype, dtype), (True, True, torch.float32, dtype),
                                                  (True, False, dtype, dtype), (False, True, dtype, torch.float32),
                                                  (True, True, dtype, torch.float16 if dtype == torch.bfloat16
                                                   else torch.bfloat16)):
        args, q = nf4_gemv_inputs(M, K, 333, r, dtype, adapter_dtype, bias, dq, device="cuda", seed=M * K + r,
                          weight_dtype=weight_dtype)
        _check_cuda_kernel(kernel, args, q, 333, f"bias={bias} dq={dq} A={adapter_dtype} stored={weight_dtype}")
    if r == 16:  # bitsandbytes' FP4: the same kernel with FP4's table (one rank: this test's time is the GPU run's)
        args, q = nf4_gemv_inputs(M, K, 333, r, dtype, dtype, True, device="cuda", seed=M * K, quant_type="fp4")
        _check_cuda_kernel(kernel, args, q, 333, "fp4")


@needs_gpu_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 9, 16])
@pytest.mark.parametrize("N,K", [(4100, 4864), (5, 256), (2200, 1024)])
def test_cuda_tensor_core_kernel_tiles_passes_and_rank_zero(dtype, M, N, K):
    """The tensor-core kernel's decomposition: more tiles than SMs (persistent blocks, the cp.async
    ring running across tile boundaries), passes that do not divide evenly among the 16 warps (K =
    4864: 19 passes), warps with no pass (K = 256, 1024), fewer rows than a tile (N = 5), one and two
    column tiles of x (M = 9, 16), rank 0 (no shrink kernel, no dependent launch) and fp32 absmax."""
    for r, dq, bias in ((16, True, True), (0, True, False), (8, False, True)):
        args, q = nf4_gemv_inputs(M, K, N, r, dtype, dtype, bias, dq, device="cuda", seed=N + K + M + r)
        _check_cuda_kernel("mma", args, q, N, f"N={N} K={K} r={r} dq={dq}")


@needs_gpu_ext
def test_cuda_tensor_core_kernel_rejects_an_ineligible_call():
    args, _ = nf4_gemv_inputs(2, 4000 + 7, 64, 8, torch.bfloat16, torch.bfloat16, False, device="cuda")
    with pytest.raises(RuntimeError, match="K % 256 == 0"):
        OP(*args, 1)


@needs_gpu_ext
def test_cuda_gemv_forward_aligns_x_for_the_tensor_core_kernel():
    args, q = nf4_gemv_inputs(3, 1024, 96, 8, torch.bfloat16, torch.bfloat16, True, device="cuda")
    wide = torch.randn(3, 1024 + 3, device="cuda", dtype=torch.bfloat16)
    x = wide[:, 3:]  # rows start 6 bytes past a 16-byte boundary, row stride 1027
    x.copy_(args[0])
    y, _ = nf4_gemv.cuda_gemv_forward(x, NF4Tensors.of(q), args[7], args[8], args[9], args[10], kernel="mma")
    y_ref, _ = nf4_gemv_reference(args, q)
    assert_close(y, y_ref, 1.5e-2, "y")


@needs_gpu_ext
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant,quant_type", [(False, "nf4"), (True, "nf4"), (True, "fp4")])
def test_cuda_slab_decode_is_bit_exact(out_dtype, double_quant, quant_type):
    for weight_dtype, q in nf4_weights_of_each_stored_dtype(300, 1024, double_quant, quant_type=quant_type):
        W = bnb_dequantized(q).to(out_dtype)
        qc = q.to("cuda")
        for n0, n1, k0, k1 in ((0, 300, 0, 1024), (17, 250, 0, 1024), (0, 300, 256, 512), (299, 300, 1016, 1024)):
            out = SLAB_OP(*nf4_slab_args(qc, n0, n1, k0, k1, out_dtype))
            assert out.dtype == out_dtype and out.shape == (n1 - n0, k1 - k0)
            assert torch.equal(out.cpu(), W[n0:n1, k0:k1]), (weight_dtype, n0, n1, k0, k1)


@needs_gpu_ext
def test_cuda_slab_decoder_in_the_large_m_route(monkeypatch):
    from lora_kernels.ops import triton_launch
    monkeypatch.setenv(nf4_gemv.NF4_SLAB_DECODER_ENV, "cuda")
    monkeypatch.setenv(triton_launch.NF4_CUBLAS_MIN_M_ENV, "1")
    monkeypatch.setenv(nf4_gemv.NF4_GEMV_ENV, "0")
    calls = []
    real = nf4_gemv.cuda_dequantize_slab
    monkeypatch.setattr(nf4_gemv, "cuda_dequantize_slab", lambda *a: (calls.append(a[1:5]), real(*a))[1])
    args, q = nf4_gemv_inputs(70, 512, 200, 16, torch.bfloat16, torch.bfloat16, False, device="cuda")
    x = args[0].requires_grad_(True)
    y = lora_kernels.nf4_lora_linear(x, q, args[7], args[8], 0.75)
    y.backward(torch.ones_like(y))
    assert calls and all(k1 - k0 > 0 for _, _, k0, k1 in calls)
    y_ref, _ = nf4_gemv_reference(args, q)
    assert_close(y, y_ref, 1.5e-2, "y")


@needs_gpu_ext
@pytest.mark.parametrize("kernel", nf4_gemv.GEMV_KERNELS)
def test_nf4_lora_linear_dispatches_to_the_cuda_gemv(monkeypatch, kernel):
    monkeypatch.setenv(nf4_gemv.NF4_GEMV_ENV, "16")
    monkeypatch.setenv(nf4_gemv.NF4_GEMV_KERNEL_ENV, kernel)
    calls = []
    real = nf4_gemv.cuda_gemv_forward

    def spy(*a, **k):
        calls.append((a[0].shape, nf4_gemv.gemv_kernel(a[0], a[1])))
        return real(*a, **k)
    monkeypatch.setattr("lora_kernels.ops.nf4_lora_linear.cuda_gemv_forward", spy)
    args, q = nf4_gemv_inputs(4, 512, 128, 16, torch.bfloat16, torch.bfloat16, False, device="cuda")
    y = lora_kernels.nf4_lora_linear(args[0], q, args[7], args[8], 0.75, training=False)
    assert calls == [((4, 512), kernel)]
    y_ref, _ = nf4_gemv_reference(args, q)
    assert_close(y, y_ref, 1.5e-2, "y")


@needs_gpu_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 3, 8, 16, 64])
@pytest.mark.parametrize("N,K", [(333, 4096), (4100, 1032)])
def test_cuda_grad_input_matches_reference(dtype, M, N, K):
    bound = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}[dtype]
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    for init, dq, weight_dtype in ((True, True, None), (False, False, None), (True, True, other)):
        args, q = nf4_grad_input_args(M, N, K, dtype, init, dq, weight_dtype, seed=M + N)
        cuda_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        poison = torch.full((M, K), float("nan"), device="cuda", dtype=dtype)
        del poison  # the op's output reuses this block from the caching allocator: NaN unless written
        dx = GRAD_OP(*cuda_args)
        assert dx.dtype == dtype and dx.shape == (M, K)
        assert_close(dx, nf4_grad_input_reference(args, q), bound, f"dx init={init} dq={dq} stored={weight_dtype}")


@needs_gpu_ext
def test_nf4_lora_linear_backward_takes_the_cuda_grad_input(monkeypatch):
    monkeypatch.setenv(nf4_gemv.NF4_GRAD_INPUT_ENV, "64")
    calls = []
    real = nf4_gemv.cuda_grad_input

    def spy(grad_y2, wq, init):
        calls.append(tuple(grad_y2.shape))
        return real(grad_y2, wq, init)
    monkeypatch.setattr(nf4_gemv, "cuda_grad_input", spy)
    args, q = nf4_gemv_inputs(6, 1024, 300, 16, torch.bfloat16, torch.bfloat16, False, device="cuda")
    x = args[0].clone().requires_grad_(True)
    y = lora_kernels.nf4_lora_linear(x, q, args[7], args[8], 0.75)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert calls == [(6, 300)]
    W = bnb_dequantized(q.to("cpu")).to(torch.bfloat16).double()
    A, B = args[7].double().cpu(), args[8].double().cpu()
    ref = grad_y.double().cpu() @ (W + 0.75 * B @ A)
    assert_close(x.grad, ref, 1.5e-2, "dx")
