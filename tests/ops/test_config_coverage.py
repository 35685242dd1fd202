"""Every entry of the tile-config table runs under the interpreter: each (dot kind, GPU family,
padded rank) picks different block sizes, and shapes are chosen to span several tiles and partial
tiles in every dimension, so the masking and split-M reduction logic is exercised per config."""
import pytest
import torch
import triton
from hypothesis import HealthCheck, example, given, settings, strategies as st

import lora_kernels
from lora_kernels.kernels import configs
from lora_kernels.ops import dropout_keep_mask, lora_linear_reference
from lora_kernels.ops import triton_launch
from tests.helpers import GridRecorder, needs_interpreter_with_tma, rel_err

pytestmark = pytest.mark.skipif(not triton_launch.is_interpreted(), reason="needs TRITON_INTERPRET=1")

# (x dtype, adapter dtype, fp32 matmul precision) -> dot kind "half", "half_lora32", "tf32", "ieee"
KINDS = {
    "half": (torch.float16, torch.float16, "highest"),
    "half_lora32": (torch.float16, torch.float32, "highest"),
    "tf32": (torch.float32, torch.float32, "high"),
    "ieee": (torch.float32, torch.float32, "highest"),
}
BOUND = {torch.float16: 3e-3, torch.float32: 1e-5}
RANK_FOR_PADDED = {16: 3, 32: 20, 64: 40, 128: 100, 256: 200}


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("arch", configs.ARCHS)
@pytest.mark.parametrize("kind", configs.DOT_KINDS)
@pytest.mark.parametrize("padded", configs.PADDED_RANKS)
def test_every_config_matches_reference(monkeypatch, arch, kind, padded):
    x_dtype, adapter_dtype, precision = KINDS[kind]
    monkeypatch.setattr(triton_launch, "_device_arch", lambda device: arch)
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "triton")
    old_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        assert configs.dot_kind(x_dtype == torch.float32, adapter_dtype == torch.float32,
                                triton_launch._fp32_precision()) == kind
        r = RANK_FOR_PADDED[padded]
        M, K, N = 67, 133, 261  # > one tile of most configs along every dimension, none a multiple
        gen = torch.Generator().manual_seed(1000 * padded + arch)
        x = torch.randn(M, K, generator=gen).to(x_dtype).requires_grad_(True)
        weight = (torch.randn(N, K, generator=gen) / K**0.5).to(x_dtype)
        lora_A = (torch.randn(r, K, generator=gen) / K**0.5).to(adapter_dtype).requires_grad_(True)
        lora_B = torch.randn(N, r, generator=gen).to(adapter_dtype).requires_grad_(True)
        bias = torch.randn(N, generator=gen).to(x_dtype).requires_grad_(True)
        grad_y = torch.randn(M, N, generator=gen).to(x_dtype)

        torch.manual_seed(7)
        y = lora_kernels.lora_linear(x, weight, lora_A, lora_B, 0.5, bias=bias, dropout_p=0.25)
        y.backward(grad_y)

        torch.manual_seed(7)
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        keep = dropout_keep_mask(seed, M, K, 0.25)
        ref_in = [t.detach().double().requires_grad_(True) for t in (x, lora_A, lora_B, bias)]
        ref = lora_linear_reference(ref_in[0], weight.double(), ref_in[1], ref_in[2], 0.5,
                                    bias=ref_in[3], keep_mask=keep, dropout_p=0.25)
        ref.backward(grad_y.double())
        bound = BOUND[x_dtype]
        assert _rel(y, ref) < bound
        for name, got, want in zip(("x", "lora_A", "lora_B", "bias"), (x, lora_A, lora_B, bias), ref_in):
            assert got.grad.dtype == got.dtype
            assert _rel(got.grad, want.grad) < bound, name
    finally:
        torch.set_float32_matmul_precision(old_precision)


@pytest.mark.parametrize("arch", configs.ARCHS)
@pytest.mark.parametrize("kind", configs.DOT_KINDS)
@pytest.mark.parametrize("padded", [16, 256])  # R_CHUNK = R, and the most R_CHUNK steps
@pytest.mark.parametrize("K", [192, 133], ids=["aligned", "per-element"])
def test_every_nf4_config_matches_reference(monkeypatch, arch, kind, padded, K):
    """The NF4 GEMMs' tiles (``configs._nf4_gemm_config``: forward and dX, per dot kind, GPU family,
    rank, and tile decode vs per-element decode) on shapes spanning several tiles and partial ones,
    forward and every gradient against float64 on the dequantized weight. M sits between the
    split-K range and the slab route (switched off here), so both NF4 GEMMs run their K-loops."""
    x_dtype, adapter_dtype, precision = KINDS[kind]
    monkeypatch.setattr(triton_launch, "_device_arch", lambda device: arch)
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "triton")
    monkeypatch.setenv(triton_launch.NF4_CUBLAS_MIN_M_ENV, "0")
    recorders = {name: GridRecorder(getattr(triton_launch, name))
                 for name in ("lora_forward_gemm_kernel", "lora_grad_input_kernel")}
    for name, recorder in recorders.items():
        monkeypatch.setattr(triton_launch, name, recorder)
    old_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        gen = torch.Generator().manual_seed(7 * padded + arch + K)
        y, ref, leaves = _layer_and_reference(configs.SMALL_M_MAX + 21, K, 150, RANK_FOR_PADDED[padded], x_dtype,
                                              adapter_dtype, "nf4", gen, grads=True)
        assert all(len(recorder.grids) == 1 for recorder in recorders.values())
        _assert_close_to_reference(y, ref, leaves, x_dtype)
    finally:
        torch.set_float32_matmul_precision(old_precision)


def _layer_and_reference(M, K, N, r, x_dtype, adapter_dtype, weight_format, gen, grads=False):
    """Runs the layer (dense, or NF4 quantized from the same weight) on fresh inputs with a bias,
    lora_B_bias and dropout 0.25, and the float64 reference with the same mask. Returns (y, ref,
    [(name, leaf, reference leaf)]); with ``grads`` both ran their backward on the same grad_y."""
    x = torch.randn(M, K, generator=gen).to(x_dtype).requires_grad_(grads)
    weight = (torch.randn(N, K, generator=gen) / K**0.5).to(x_dtype)
    lora_A = (torch.randn(r, K, generator=gen) / K**0.5).to(adapter_dtype).requires_grad_(grads)
    lora_B = torch.randn(N, r, generator=gen).to(adapter_dtype).requires_grad_(grads)
    bias = torch.randn(N, generator=gen).to(x_dtype).requires_grad_(grads)
    lora_B_bias = torch.randn(N, generator=gen).to(adapter_dtype)
    kwargs = dict(bias=bias, lora_B_bias=lora_B_bias, dropout_p=0.25)
    torch.manual_seed(11)
    if weight_format == "nf4":
        qweight = lora_kernels.NF4Weight.quantize(weight)
        y = lora_kernels.nf4_lora_linear(x, qweight, lora_A, lora_B, 0.5, **kwargs)
        weight = qweight.dequantize()
    else:
        y = lora_kernels.lora_linear(x, weight, lora_A, lora_B, 0.5, **kwargs)
    torch.manual_seed(11)
    keep = dropout_keep_mask(torch.randint(0, 2**62, (1,), dtype=torch.int64), M, K, 0.25)
    leaves = {"x": x, "lora_A": lora_A, "lora_B": lora_B, "bias": bias}
    grad_y = torch.randn(M, N, generator=gen).to(x_dtype) if grads else None

    def reference(up):  # float64 y and leaves (with their gradients when ``grads``) on up(inputs)
        ref_leaves = {n: up(t).requires_grad_(grads) for n, t in leaves.items()}
        ref = lora_linear_reference(ref_leaves["x"], up(weight), ref_leaves["lora_A"], ref_leaves["lora_B"], 0.5,
                                    bias=ref_leaves["bias"], lora_B_bias=up(lora_B_bias), keep_mask=keep,
                                    dropout_p=0.25)
        if grads:
            ref.backward(up(grad_y))
        return ref, ref_leaves

    ref, ref_leaves = reference(lambda t: t.detach().double())
    # The same on |inputs|: gradient magnitudes for the cancellation floor (tests.helpers.rel_err),
    # e.g. dB of N = r = 1 is one sum over M whose terms may nearly cancel.
    _, mag_leaves = reference(lambda t: t.detach().double().abs())
    if grads:
        y.backward(grad_y)
    return y, ref, [(n, leaves[n], ref_leaves[n], mag_leaves[n].grad) for n in leaves]


def _assert_close_to_reference(y, ref, leaves, x_dtype):
    """y and every leaf's gradient (``_layer_and_reference``'s tuples) within x's dtype bound."""
    bound = BOUND[x_dtype]
    assert y.dtype == x_dtype and _rel(y, ref) < bound
    for name, got, want, magnitude in leaves:
        assert rel_err(got.grad, want.grad, magnitude) < bound, name


@pytest.mark.parametrize("arch", configs.ARCHS)
@pytest.mark.parametrize("weight_format", ["dense", "nf4"])
@pytest.mark.parametrize("kind", configs.DOT_KINDS)
@pytest.mark.parametrize("M", [1, 5, configs.SMALL_M_MAX, configs.SMALL_M_MAX + 1])
def test_small_m_split_k_matches_reference(monkeypatch, arch, weight_format, kind, M):
    # M <= SMALL_M_MAX runs the forward GEMM split-K over a second grid axis (fp32 partials summed
    # on the host; LoRA term and bias added by split 0 only); above it, one split. The small-M
    # tiles differ per GPU family (NF4 K step), so both families' configs run.
    x_dtype, adapter_dtype, precision = KINDS[kind]
    monkeypatch.setattr(triton_launch, "_device_arch", lambda device: arch)
    recorder = GridRecorder(triton_launch.lora_forward_gemm_kernel)
    monkeypatch.setattr(triton_launch, "lora_forward_gemm_kernel", recorder)
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "triton")
    old_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        K, N, r = 333, 40, 7  # several BLOCK_K of every small-M config, a partial last block
        gen = torch.Generator().manual_seed(M * 31 + len(kind))
        y, ref, _ = _layer_and_reference(M, K, N, r, x_dtype, adapter_dtype, weight_format, gen)
        assert len(recorder.grids) == 1
        splits = recorder.grids[0][1]
        assert (splits > 1) == (M <= configs.SMALL_M_MAX)
        assert y.dtype == x_dtype and y.shape == (M, N)
        assert _rel(y, ref) < BOUND[x_dtype]
    finally:
        torch.set_float32_matmul_precision(old_precision)


@pytest.mark.parametrize("override, M, split", [("32", 17, True), ("32", 32, True), ("0", 1, False),
                                                 (" 4 ", 5, False), ("", 1, True)])
def test_small_m_env_override(monkeypatch, override, M, split):
    recorder = GridRecorder(triton_launch.lora_forward_gemm_kernel)
    monkeypatch.setattr(triton_launch, "lora_forward_gemm_kernel", recorder)
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "triton")
    monkeypatch.setenv(triton_launch.SMALL_M_ENV, override)
    gen = torch.Generator().manual_seed(M)
    x, weight = torch.randn(M, 200, generator=gen), torch.randn(24, 200, generator=gen) / 15
    A, B = torch.randn(3, 200, generator=gen) / 15, torch.randn(24, 3, generator=gen)
    y = lora_kernels.lora_linear(x, weight, A, B, 0.5)
    assert (recorder.grids[0][1] > 1) == split
    ref = lora_linear_reference(x.double(), weight.double(), A.double(), B.double(), 0.5)
    assert _rel(y, ref) < BOUND[torch.float32]


@pytest.mark.parametrize("bad", ["-1", "sixteen", "1.5"])
def test_small_m_env_rejects_bad_values(monkeypatch, bad):
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "triton")
    monkeypatch.setenv(triton_launch.SMALL_M_ENV, bad)
    with pytest.raises(ValueError, match=triton_launch.SMALL_M_ENV):
        lora_kernels.lora_linear(torch.randn(2, 8), torch.randn(4, 8), torch.randn(1, 8), torch.randn(4, 1), 1.0)


FUSED_KINDS = [k for k in configs.DOT_KINDS if configs.fused_forward_supported(16, k, 90)]


# NF4 with K = 192: the tile decode (x's even and odd columns against the two nibbles, h from both)
@pytest.mark.parametrize("weight_format,K", [("dense", 150), ("nf4", 150), ("nf4", 192)])
@pytest.mark.parametrize("kind", FUSED_KINDS)
@pytest.mark.parametrize("r", [3, 20])  # padded ranks 16 and 32: the fused kernel's range
def test_fused_forward_matches_reference(monkeypatch, weight_format, K, kind, r):
    # The one-launch forward (h accumulated inside the GEMM's first tile per program, column groups
    # walking strided tiles) against float64, forward and every gradient (the backward uses its h).
    x_dtype, adapter_dtype, precision = KINDS[kind]
    recorder = GridRecorder(triton_launch.lora_forward_fused_kernel)
    monkeypatch.setattr(triton_launch, "lora_forward_fused_kernel", recorder)
    arch = 90  # the GPU family it runs on (fused_forward_supported)
    monkeypatch.setattr(triton_launch, "_device_arch", lambda device: arch)
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "triton")
    monkeypatch.setenv(triton_launch.FUSED_MIN_M_ENV, "17")
    monkeypatch.setattr(triton_launch, "fused_column_groups", lambda m_blocks, n_tiles, device: 2)
    old_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        M, N = 45, 520  # several column tiles per group, partial tiles everywhere
        gen = torch.Generator().manual_seed(r * 7 + len(kind))
        y, ref, leaves = _layer_and_reference(M, K, N, r, x_dtype, adapter_dtype, weight_format, gen, grads=True)
        # one launch, two column groups, each walking more than one column tile
        block_n = configs.fused_forward_config(configs.padded_rank(r), kind, arch, weight_format).blocks["BLOCK_N"]
        assert len(recorder.grids) == 1 and recorder.grids[0][1] == 2 and triton.cdiv(N, block_n) > 2
        _assert_close_to_reference(y, ref, leaves, x_dtype)
    finally:
        torch.set_float32_matmul_precision(old_precision)


def test_fused_column_groups():
    cpu = torch.device("cpu")  # 4 target programs under the interpreter
    assert [triton_launch.fused_column_groups(m, 8, cpu) for m in (1, 2, 3, 4, 9)] == [4, 2, 2, 1, 1]
    assert triton_launch.fused_column_groups(1, 3, cpu) == 3  # never more groups than column tiles


@pytest.mark.parametrize("min_m, M, r, arch, precision, scale, fused", [
    ("0", 40, 4, 90, "high", 0.5, False),     # off by default
    ("17", 40, 4, 90, "high", 0.5, True),
    ("41", 40, 4, 90, "high", 0.5, False),    # below the threshold
    ("17", 16, 4, 90, "high", 0.5, False),    # small M: split-K path
    ("17", 40, 40, 90, "high", 0.5, False),   # padded rank 64
    ("17", 40, 4, 80, "high", 0.5, False),    # sm_80
    ("17", 40, 4, 90, "highest", 0.5, False),  # exact fp32 dots
    ("17", 40, 4, 90, "high", 0.0, False),    # scale 0 (the epilogue divides by it)
    ("17", 40, 4, 90, "high", 1e-38, False),  # 1 / scale overflows fp32: inf in the fused epilogue
    ("17", 40, 4, 90, "high", 2.0 ** 61, False),  # the base product ÷ scale would lose precision
    ("17", 40, 4, 90, "high", 2.0 ** -60, True),
    ("17", 40, 4, 90, "high", -0.5, True),
])
def test_fused_forward_dispatch(monkeypatch, min_m, M, r, arch, precision, scale, fused):
    x = torch.randn(M, 48, generator=torch.Generator().manual_seed(M + r))
    _check_dispatch(monkeypatch, "lora_forward_fused_kernel", triton_launch.FUSED_MIN_M_ENV, min_m, arch, precision,
                    x, r, scale, fused)


def _check_dispatch(monkeypatch, kernel_name, env, min_m, arch, precision, x, r, scale, launched,
                    transposed_weight=False):
    """Runs lora_linear on x [M, K] (fresh W [24, K], rank r; ``transposed_weight``: W the transposed
    view of a [K, 24] tensor) with ``env`` = min_m, the GPU family ``arch`` and the fp32 matmul
    ``precision``; checks whether ``kernel_name`` ran, and y."""
    recorder = GridRecorder(getattr(triton_launch, kernel_name))
    monkeypatch.setattr(triton_launch, kernel_name, recorder)
    monkeypatch.setattr(triton_launch, "_device_arch", lambda device: arch)
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "triton")
    monkeypatch.setenv(env, min_m)
    old_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        gen = torch.Generator().manual_seed(x.shape[0] + r)
        K = x.shape[1]
        weight = (torch.randn(K, 24, generator=gen).t() if transposed_weight else torch.randn(24, K, generator=gen)) / 7
        A, B = torch.randn(r, K, generator=gen) / 7, torch.randn(24, r, generator=gen)
        y = lora_kernels.lora_linear(x, weight, A, B, scale)
    finally:
        torch.set_float32_matmul_precision(old_precision)
    assert bool(recorder.grids) == launched
    ref = lora_linear_reference(x.double(), weight.double(), A.double(), B.double(), scale)
    assert _rel(y, ref) < 1e-3


def test_fused_forward_not_for_a_transposed_weight(monkeypatch):
    # a Conv1D's weight as the PEFT patch passes it: the two-launch forward (configs.TRANSPOSED_WEIGHT_KERNELS)
    x = torch.randn(40, 48, generator=torch.Generator().manual_seed(3))
    _check_dispatch(monkeypatch, "lora_forward_fused_kernel", triton_launch.FUSED_MIN_M_ENV, "17", 90, "high",
                    x, 4, 0.5, False, transposed_weight=True)
    _check_dispatch(monkeypatch, "lora_forward_gemm_kernel", triton_launch.FUSED_MIN_M_ENV, "17", 90, "high",
                    x, 4, 0.5, True, transposed_weight=True)
    # a transposed x is copied to unit stride along K first (unit_inner_stride): the fused kernel runs
    x_t = torch.randn(48, 40, generator=torch.Generator().manual_seed(4)).t()
    _check_dispatch(monkeypatch, "lora_forward_fused_kernel", triton_launch.FUSED_MIN_M_ENV, "17", 90, "high",
                    x_t, 4, 0.5, True)


@pytest.mark.parametrize("k_step", [1, 2])
def test_fused_forward_strided_and_3d_input(monkeypatch, k_step):
    # x with leading dims and a row stride of its own: the kernel takes the strides as given; with a K
    # stride of 2 (k_step) x is copied to unit stride first (unit_inner_stride: the kernels spill
    # otherwise).
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "triton")
    monkeypatch.setenv(triton_launch.FUSED_MIN_M_ENV, "1")
    recorder = GridRecorder(triton_launch.lora_forward_fused_kernel)
    monkeypatch.setattr(triton_launch, "lora_forward_fused_kernel", recorder)
    gen = torch.Generator().manual_seed(21)
    big = torch.randn(3, 11, 2 * 70, generator=gen, dtype=torch.float16)
    x = big[..., ::k_step][..., :70]  # [3, 11, 70], rows 140 apart, stride k_step along K
    weight = (torch.randn(90, 70, generator=gen) / 8).half()
    A = (torch.randn(6, 70, generator=gen) / 8).half().requires_grad_(True)
    B = torch.randn(90, 6, generator=gen).half().requires_grad_(True)
    y = lora_kernels.lora_linear(x, weight, A, B, 1.5)
    y.float().sum().backward()
    assert recorder.grids and y.shape == (3, 11, 90)
    Ar, Br = A.detach().double().requires_grad_(True), B.detach().double().requires_grad_(True)
    ref = lora_linear_reference(x.double(), weight.double(), Ar, Br, 1.5)
    ref.sum().backward()
    assert _rel(y, ref) < BOUND[torch.float16]
    assert _rel(A.grad, Ar.grad) < BOUND[torch.float16] and _rel(B.grad, Br.grad) < BOUND[torch.float16]


TMA_KINDS = [k for k in configs.DOT_KINDS if configs.tma_supported(16, k, 90)]


@needs_interpreter_with_tma
@pytest.mark.parametrize("kind", TMA_KINDS)
@pytest.mark.parametrize("r", [3, 40, 200])  # padded ranks 16, 64, 256 (the LoRA terms' R_CHUNK loops)
def test_tma_gemms_match_reference(monkeypatch, kind, r):
    # Both TMA GEMMs (forward, dX) against float64, forward and every gradient: partial tiles in M,
    # N and K (the descriptors zero-fill what lies outside x, dY and W).
    x_dtype, adapter_dtype, precision = KINDS[kind]
    recorders = {}
    for name in ("lora_forward_gemm_tma_kernel", "lora_grad_input_tma_kernel"):
        recorders[name] = GridRecorder(getattr(triton_launch, name))
        monkeypatch.setattr(triton_launch, name, recorders[name])
    monkeypatch.setattr(triton_launch, "_device_arch", lambda device: 90)
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "triton")
    monkeypatch.setenv(triton_launch.TMA_MIN_M_ENV, "17")
    old_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        M, K, N = 45, 152, 296  # rows of x, dY and W 16-byte aligned
        gen = torch.Generator().manual_seed(r * 5 + len(kind))
        y, ref, leaves = _layer_and_reference(M, K, N, r, x_dtype, adapter_dtype, "dense", gen, grads=True)
        fwd = configs.tma_forward_config(configs.padded_rank(r), kind, 90).blocks
        dx = configs.tma_grad_input_config(configs.padded_rank(r), kind, 90).blocks
        assert recorders["lora_forward_gemm_tma_kernel"].grids == [
            (triton.cdiv(M, fwd["BLOCK_M"]) * triton.cdiv(N, fwd["BLOCK_N"]),)]
        assert recorders["lora_grad_input_tma_kernel"].grids == [
            (triton.cdiv(M, dx["BLOCK_M"]) * triton.cdiv(K, dx["BLOCK_K"]),)]
        assert K % fwd["BLOCK_K"] and N % fwd["BLOCK_N"] and M % fwd["BLOCK_M"]
        assert K % dx["BLOCK_K"] and N % dx["BLOCK_N"] and M % dx["BLOCK_M"]
        _assert_close_to_reference(y, ref, leaves, x_dtype)
    finally:
        torch.set_float32_matmul_precision(old_precision)


@pytest.mark.parametrize("N, dy_layout, tma", [
    pytest.param(24, "contiguous", True, marks=needs_interpreter_with_tma), (21, "contiguous", False),
    (24, "odd_row_stride", False), pytest.param(24, "step_2", True, marks=needs_interpreter_with_tma)])
def test_tma_grad_input_dispatch(monkeypatch, N, dy_layout, tma):
    # dY [M, N] must be TMA-addressable too: rows of 84 B, or rows 50 B apart, keep the pointer dX GEMM;
    # a dY with a step along N is copied to unit stride first (unit_inner_stride), then addressable
    recorder = GridRecorder(triton_launch.lora_grad_input_tma_kernel)
    monkeypatch.setattr(triton_launch, "lora_grad_input_tma_kernel", recorder)
    monkeypatch.setattr(triton_launch, "_device_arch", lambda device: 90)
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "triton")
    monkeypatch.setenv(triton_launch.TMA_MIN_M_ENV, "1")
    gen = torch.Generator().manual_seed(N)
    x = torch.randn(40, 48, generator=gen, dtype=torch.float16, requires_grad=True)
    weight = (torch.randn(N, 48, generator=gen) / 7).half()
    A = (torch.randn(4, 48, generator=gen) / 7).half().requires_grad_(True)
    B = torch.randn(N, 4, generator=gen).half().requires_grad_(True)
    dy = torch.randn(40, 2 * N, generator=gen).half()
    dy = {"contiguous": dy[:, :N].contiguous(), "odd_row_stride": torch.randn(40, N + 1, generator=gen).half()[:, :N],
          "step_2": dy[:, ::2]}[dy_layout]
    lora_kernels.lora_linear(x, weight, A, B, 0.5).backward(dy)
    assert bool(recorder.grids) == tma
    xr, Ar, Br = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    lora_linear_reference(xr, weight.double(), Ar, Br, 0.5).backward(dy.double())
    for got, want in ((x, xr), (A, Ar), (B, Br)):
        assert _rel(got.grad, want.grad) < BOUND[torch.float16]


def _strided_x(M, K, gen):
    return torch.randn(M, 2 * K, generator=gen)[:, ::2]


def _offset_x(M, K, gen):
    return torch.randn(M * K + 1, generator=gen)[1:].view(M, K)  # start 4 bytes past an aligned one


def _broadcast_x(M, K, gen):
    return torch.randn(1, K, generator=gen).expand(M, K)  # row stride 0


@pytest.mark.parametrize("min_m, M, K, arch, precision, make_x, tma", [
    ("0", 40, 48, 90, "high", None, False),        # 0: off
    ("17", 40, 48, 90, "high", None, True),
    ("41", 40, 48, 90, "high", None, False),       # below the threshold
    ("17", 16, 48, 90, "high", None, False),       # small M: split-K path
    ("17", 40, 48, 80, "high", None, False),       # sm_80
    ("17", 40, 48, 90, "highest", None, False),    # exact fp32 dots
    ("17", 40, 50, 90, "high", None, False),       # rows of 200 B: not 16-byte aligned
    ("17", 40, 48, 90, "high", _strided_x, True),   # x's inner stride 2: copied to unit stride first
    ("17", 40, 48, 90, "high", _offset_x, False),   # x starts off a 16-byte boundary
    ("17", 40, 48, 90, "high", _broadcast_x, False),  # one row broadcast to all: stride 0
])
def test_tma_forward_dispatch(monkeypatch, min_m, M, K, arch, precision, make_x, tma):
    gen = torch.Generator().manual_seed(M + K)
    x = make_x(M, K, gen) if make_x else torch.randn(M, K, generator=gen)
    _check_dispatch(monkeypatch, "lora_forward_gemm_tma_kernel", triton_launch.TMA_MIN_M_ENV, min_m, arch, precision,
                    x, 4, 0.5, tma)


def test_tma_forward_never_takes_nf4_weights(monkeypatch):
    recorder = GridRecorder(triton_launch.lora_forward_gemm_tma_kernel)
    monkeypatch.setattr(triton_launch, "lora_forward_gemm_tma_kernel", recorder)
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "triton")
    monkeypatch.setenv(triton_launch.TMA_MIN_M_ENV, "1")
    gen = torch.Generator().manual_seed(3)
    y, ref, _ = _layer_and_reference(40, 64, 24, 4, torch.float16, torch.float16, "nf4", gen)
    assert not recorder.grids and _rel(y, ref) < BOUND[torch.float16]


@needs_interpreter_with_tma
@settings(deadline=None, max_examples=24, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(variant=st.sampled_from(["fused", "tma"]), M=st.integers(17, 90),
       K=st.one_of(st.integers(2, 25).map(lambda k: 8 * k), st.integers(16, 200)),  # TMA needs 16-byte rows
       N=st.integers(1, 300), r=st.integers(1, 128), adapter_dtype=st.sampled_from([torch.float16, torch.float32]),
       weight_format=st.sampled_from(["dense", "nf4"]), seed=st.integers(0, 2**31 - 1))
# dB of N = r = 1 is one sum over 36 rows whose terms nearly cancel (fp16 h): judged against the
# gradient magnitudes since a local run drew it.
@example(variant="fused", M=36, K=16, N=1, r=1, adapter_dtype=torch.float16, weight_format="dense", seed=15841)
def test_forward_variants_on_drawn_shapes(monkeypatch, variant, M, K, N, r, adapter_dtype, weight_format, seed):
    # Each opt-in forward switched on for every M above the small-M path, on drawn shapes: where it
    # does not apply (rank, NF4 for TMA, unaligned rows) the default forward runs; either way the
    # layer must match float64, forward and every gradient.
    monkeypatch.setattr(triton_launch, "_device_arch", lambda device: 90)
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "triton")
    # Both set on every example: monkeypatch undoes only after the last one, so an example's variant
    # would otherwise stay on in the examples after it.
    for name, env in (("fused", triton_launch.FUSED_MIN_M_ENV), ("tma", triton_launch.TMA_MIN_M_ENV)):
        monkeypatch.setenv(env, "1" if variant == name else "0")
    gen = torch.Generator().manual_seed(seed)
    y, ref, leaves = _layer_and_reference(M, K, N, r, torch.float16, adapter_dtype, weight_format, gen, grads=True)
    _assert_close_to_reference(y, ref, leaves, torch.float16)


def test_tma_default_threshold(monkeypatch):
    # without the variable: configs.TMA_MIN_M (measured on an H200), for TMA-compatible operands
    monkeypatch.delenv(triton_launch.TMA_MIN_M_ENV, raising=False)
    x, w = torch.empty(8, 64, dtype=torch.bfloat16), torch.empty(32, 64, dtype=torch.bfloat16)
    m = configs.TMA_MIN_M
    assert m > 0 and triton_launch.use_tma(m, 16, "half", 90, x, w)
    assert not triton_launch.use_tma(m - 1, 16, "half", 90, x, w)
    assert not triton_launch.use_tma(m, 16, "half", 80, x, w)
