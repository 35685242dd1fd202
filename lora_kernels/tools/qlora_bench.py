"""Benchmark of one QLoRA layer (NF4 base weight + LoRA): ``python -m lora_kernels qlora``, and the
"nf4" family of ``python -m lora_kernels bench``.

Providers, all on the same NF4 bytes (block size 64, double quantization), adapters and x, timed
in the same run with the timers of ``lora_kernels.tools.bench`` (medians; do_bench on CUDA):
    lora_kernels_nf4       ``lora_kernels.nf4_lora_linear`` (A and B trainable)
    lora_kernels_nf4_fa    the same with lora_A frozen (LoRA-FA)
    lora_kernels_nf4_gemv  the same with the CUDA C++ decode GEMV forced on (csrc/, its SIMT kernel; CUDA
                           with the built extension, M <= 64 (one launch per 16 rows), fp16/bf16,
                           r <= 64 only: "not_applicable" elsewhere)
    lora_kernels_nf4_gemv_mma the same with the GEMV's tensor-core kernel (where it can take the call)
    lora_kernels_nf4_fused the same with the one-launch forward switched on (see bench's
                           lora_kernels_fused; "not_applicable" where it would not run)
    lora_kernels_nf4_cublas the same with the slab-decode + cuBLAS base products switched on for
                           every M (LORA_KERNELS_NF4_CUBLAS_MIN_M=1; the LoRA terms stay in the kernels;
                           slabs by the default decoder: bitsandbytes' kernel for the forward's on CUDA)
    lora_kernels_nf4_cublas_cuda the slab route with the slabs decoded by the CUDA kernel of csrc/
                           (LORA_KERNELS_NF4_SLAB_DECODER=cuda; CUDA with the built extension only)
    lora_kernels_nf4_cublas_triton the slab route with every slab decoded by the Triton tiles
                           (LORA_KERNELS_NF4_SLAB_DECODER=triton: the default before bitsandbytes' kernel)
    lora_kernels_nf4_triton the same with them switched off (=0): the fused NF4 GEMMs at every M
                           (these four and _fused with the CUDA GEMV off: ``PATH_SETTINGS``)
    lora_kernels_nf4_cuda_dx lora_kernels_nf4 with the backward's dX = dY W on the CUDA kernel of csrc/
                           for M <= 64 (LORA_KERNELS_NF4_GRAD_INPUT_MAX_M=64; CUDA with the built
                           extension; "not_applicable" above 64 rows, where it would repeat lora_kernels_nf4)
    peft_qlora             PEFT ``lora.bnb.Linear4bit`` around a bitsandbytes ``Linear4bit`` holding
                           the same NF4 tensors (what transformers + PEFT build for QLoRA)
    peft_qlora_fa          the same with lora_A frozen: lora_kernels_nf4_fa's reference
    bnb_matmul_4bit        ``bitsandbytes.matmul_4bit``: the NF4 base matmul alone, no LoRA
    base_dense             ``F.linear(x, W)`` with W = dequant(Q) in x's dtype: the dense (cuBLAS) floor
x requires grad (a hidden layer). "infer" is the forward under ``torch.no_grad()`` with x not
requiring grad: bitsandbytes then takes its 4-bit GEMV for one row. Ratios are times over the
reference's time in the same case (< 1: faster): *_vs_peft against peft_qlora (the A-frozen rows
against peft_qlora_fa), *_vs_base against base_dense. Rows also carry the saved activations of one forward and, on CUDA, the peak memory of
one fwd+bwd.

``qlora`` default sweep: (K, N) in ``CUDA_KN`` x M in ``CUDA_M`` (decode to training sizes), r = 16,
modes fwd, bwd, fwdbwd, infer on a GPU; ``CPU_KN`` x ``CPU_M`` on CPU. ``--quick``: the first
(K, N) and M in {1, 16, 4096} (GPU) or {1, 16} (CPU), shorter timing. The options are those of
``bench`` (``--model``, ``--proj``, ``--m``, ``--rank``, ``--shapes``, ``--providers``, ``--modes``).
"""
import argparse
import functools
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_kernels.tools import memory
from lora_kernels.tools.models import bitsandbytes_importable
from lora_kernels.tools.bench import (Family, Impl, add_sweep_arguments, default_out_dir, default_timing,
                                      format_goals, fused_forward, fused_forward_not_applicable, goal_check,
                                      csv_fields, environment_metadata, measure, with_env,
                                      random_factory, resolve_cases,
                                      resolve_device_dtype, resolve_providers, run_family, sweep_kwargs,
                                      unmeasured_rows,
                                      write_outputs, check_names, ALL_MODES, standalone_main)
from lora_kernels.tools.report import absolute_times

GEMV_IMPLS = ("lora_kernels_nf4_gemv", "lora_kernels_nf4_gemv_mma")
# CUDA with the built extension only
EXTENSION_IMPLS = GEMV_IMPLS + ("lora_kernels_nf4_cublas_cuda", "lora_kernels_nf4_cuda_dx")
LORA_IMPLS = ("lora_kernels_nf4", "lora_kernels_nf4_fa", *GEMV_IMPLS, "lora_kernels_nf4_fused",
              "lora_kernels_nf4_cublas", "lora_kernels_nf4_cublas_cuda", "lora_kernels_nf4_cublas_triton",
              "lora_kernels_nf4_triton", "lora_kernels_nf4_cuda_dx", "peft_qlora", "peft_qlora_fa")  # base + LoRA
QLORA_IMPLS = LORA_IMPLS + ("bnb_matmul_4bit", "base_dense")
# The like-for-like PEFT reference of a row (others: peft_qlora): A frozen against A frozen.
PEFT_REFS = {"lora_kernels_nf4_fa": "peft_qlora_fa", "peft_qlora_fa": "peft_qlora_fa"}
NF4_IMPLS = LORA_IMPLS + ("bnb_matmul_4bit",)
PHASES = ("fwd", "bwd", "fwdbwd", "infer")
RANK = 16
CUDA_M = (1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096, 8192)
CUDA_KN = ((4096, 4096), (4096, 14336), (8192, 28672))
# K a multiple of 64 on CPU: bitsandbytes 0.50's native CPU dequantize mis-scales rows whose
# quantization blocks span two rows when K % 16 == 0 (PEFT's QLoRA forward goes through it).
CPU_M = (1, 16, 256)
CPU_KN = ((512, 512), (1024, 2048))
EXTRA_FIELDS = ("saved_bytes", "peak_fwdbwd_bytes")
# Goals of the QLoRA issue, checked on GPU results (times relative to the reference, same run).
GOALS = {
    "nf4_gemm_vs_dense_fwd_max": 1.05,      # M >= 4096: lora_kernels_nf4 fwd / base_dense fwd
    "fwd_vs_peft_max": 1 / 1.3,             # 2 <= M <= 64: lora_kernels_nf4 fwd / peft_qlora fwd
    "fwdbwd_vs_peft_max": 1 / 1.5,          # every M: lora_kernels_nf4 fwd+bwd / peft_qlora fwd+bwd
}


def qlora_grid(device: torch.device, quick: bool = False) -> tuple:
    """Default (kns, ms) of ``qlora``: the issue's M x (K, N) grid on CUDA, a small one on CPU."""
    if device.type == "cuda":
        return (CUDA_KN[:1], (1, 16, 4096)) if quick else (CUDA_KN, CUDA_M)
    return (CPU_KN[:1], (1, 16)) if quick else (CPU_KN, CPU_M)


def default_shapes(device: torch.device) -> list:
    """(M, K, N, r) of the default ``qlora`` grid on ``device`` (r = 16)."""
    kns, ms = qlora_grid(torch.device(device))
    return [(M, K, N, RANK) for (K, N) in kns for M in ms]


class QLoRAProblem:
    """x [M, K] (requires grad), qweight NF4 [N, K], dense = dequant(qweight) [N, K] in x's dtype,
    lora_A [r, K], lora_B [N, r] (random, not PEFT's zero init), scale = lora_alpha / r = 2."""

    def __init__(self, M: int, K: int, N: int, r: int, device, dtype, seed: int = 0):
        from lora_kernels import NF4Weight

        rand = random_factory(device, dtype, seed)
        self.x = rand(M, K).to(device).requires_grad_(True)
        self.qweight = NF4Weight.quantize(rand(N, K, std=K ** -0.5).to(device), blocksize=64, double_quant=True)
        self.dense = self.qweight.dequantize(dtype)
        self.lora_A = rand(r, K, std=K ** -0.5).to(device).requires_grad_(True)
        self.lora_B = rand(N, r, std=r ** -0.5).to(device).requires_grad_(True)
        self.r, self.alpha = r, 2 * r
        self.scale = self.alpha / r

    def quant_tensors(self) -> list:
        q = self.qweight
        return [t for t in (q.packed, q.absmax, q.code, q.absmax_code, q.absmax_scale, q.absmax_offset)
                if t is not None]


def _peft_qlora_layer(p: QLoRAProblem, freeze_A: bool = False):
    """PEFT's ``lora.bnb.Linear4bit`` over a bnb ``Linear4bit`` sharing ``p.qweight``'s tensors."""
    import peft
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    from lora_kernels.integrations.bitsandbytes import linear4bit_from_nf4

    base = linear4bit_from_nf4(p.qweight)
    base.compute_dtype = p.x.dtype
    model = torch.nn.Sequential(base)
    model.is_loaded_in_4bit = True  # what transformers sets: PEFT then wraps in lora.bnb.Linear4bit
    cfg = peft.LoraConfig(r=p.r, lora_alpha=p.alpha, target_modules=["0"], lora_dropout=0.0)
    layer = peft.get_peft_model(model, cfg, autocast_adapter_dtype=False).base_model.model[0]
    if type(layer) is not PeftLinear4bit:
        raise RuntimeError(f"PEFT built {type(layer).__name__}, not lora.bnb.Linear4bit")
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        a.copy_(p.lora_A)
        b.copy_(p.lora_B)
    a.requires_grad_(not freeze_A)
    # Training mode also for inference timing: bitsandbytes' CPU backend repacks the weight in
    # place on the first eval-mode forward, which would change the bytes the other rows share.
    layer.train(True)
    return layer, [a, b]


def build_qlora_impls(p: QLoRAProblem, impls=QLORA_IMPLS) -> dict:
    """name -> Impl for the requested provider names (see ``QLORA_IMPLS``)."""
    from lora_kernels import nf4_lora_linear

    unknown = set(impls) - set(QLORA_IMPLS)
    if unknown:
        raise ValueError(f"unknown implementations {sorted(unknown)}; choose from {QLORA_IMPLS}")
    x, q, A, B, s, W = p.x, p.qweight, p.lora_A, p.lora_B, p.scale, p.dense
    x_infer, A_frozen = x.detach(), A.detach()
    params = p.quant_tensors() + [W, A, B]
    out = {}
    for name in impls:
        if name in ("lora_kernels_nf4", "lora_kernels_nf4_fa"):
            a = A if name == "lora_kernels_nf4" else A_frozen
            out[name] = Impl(name, lambda a=a: nf4_lora_linear(x, q, a, B, s),
                             [x, B] + ([A] if a is A else []), params,
                             infer=lambda a=a: nf4_lora_linear(x_infer, q, a, B, s))
        elif name in GEMV_IMPLS:
            out[name] = Impl(name, lambda: nf4_lora_linear(x, q, A, B, s), [x, A, B], params,
                             infer=lambda: nf4_lora_linear(x_infer, q, A, B, s),
                             around=functools.partial(_with_gemv, "mma" if name.endswith("_mma") else "simt"))
        elif name in PATH_SETTINGS:
            out[name] = Impl(name, lambda: nf4_lora_linear(x, q, A, B, s), [x, A, B], params,
                             infer=lambda: nf4_lora_linear(x_infer, q, A, B, s),
                             around=functools.partial(_with_path, name))
        elif name in ("peft_qlora", "peft_qlora_fa"):
            frozen = name == "peft_qlora_fa"
            layer, adapters = _peft_qlora_layer(p, freeze_A=frozen)
            out[name] = Impl(name, lambda layer=layer: layer(x), [x] + adapters[frozen:], params + adapters,
                             infer=lambda layer=layer: layer(x_infer))
        elif name == "bnb_matmul_4bit":
            import bitsandbytes as bnb

            from lora_kernels.integrations.bitsandbytes import nf4_to_bnb

            weight, state = nf4_to_bnb(q)
            out[name] = Impl(name, lambda: bnb.matmul_4bit(x, weight.data.t(), quant_state=state), [x], params,
                             infer=lambda: bnb.matmul_4bit(x_infer, weight.data.t(), quant_state=state))
        elif name == "base_dense":
            out[name] = Impl(name, lambda: F.linear(x, W), [x], params, infer=lambda: F.linear(x_infer, W))
    return out


# The dispatch switches of the providers that pin one path of nf4_lora_linear at every M (the CUDA
# GEMV off, else it would take M <= 16): name -> {environment variable: value}, plus the one-launch
# forward for lora_kernels_nf4_fused (a fused GEMM: the slab path off for it).
PATH_SETTINGS = {
    "lora_kernels_nf4_fused": {"LORA_KERNELS_NF4_CUBLAS_MIN_M": 0, "LORA_KERNELS_NF4_GEMV_MAX_M": 0},
    "lora_kernels_nf4_cublas": {"LORA_KERNELS_NF4_CUBLAS_MIN_M": 1, "LORA_KERNELS_NF4_GEMV_MAX_M": 0},
    "lora_kernels_nf4_cublas_cuda": {"LORA_KERNELS_NF4_CUBLAS_MIN_M": 1, "LORA_KERNELS_NF4_GEMV_MAX_M": 0,
                                     "LORA_KERNELS_NF4_SLAB_DECODER": "cuda"},
    "lora_kernels_nf4_cublas_triton": {"LORA_KERNELS_NF4_CUBLAS_MIN_M": 1, "LORA_KERNELS_NF4_GEMV_MAX_M": 0,
                                       "LORA_KERNELS_NF4_SLAB_DECODER": "triton"},
    "lora_kernels_nf4_triton": {"LORA_KERNELS_NF4_CUBLAS_MIN_M": 0, "LORA_KERNELS_NF4_GEMV_MAX_M": 0},
    "lora_kernels_nf4_cuda_dx": {"LORA_KERNELS_NF4_GRAD_INPUT_MAX_M": 64},
}


def _with_gemv(kernel: str, fn):
    """A callable running fn() with the CUDA GEMV on for every M it takes, with ``kernel``."""
    from lora_kernels.ops.nf4_gemv import GEMV_CHUNKED_MAX_M, NF4_GEMV_ENV, NF4_GEMV_KERNEL_ENV
    return with_env(NF4_GEMV_ENV, GEMV_CHUNKED_MAX_M, with_env(NF4_GEMV_KERNEL_ENV, kernel, fn))


def _with_path(name: str, fn):
    """A callable running fn() with provider ``name``'s dispatch switches (``PATH_SETTINGS``)."""
    if name == "lora_kernels_nf4_fused":
        fn = fused_forward(fn)
    for variable, value in PATH_SETTINGS[name].items():
        fn = with_env(variable, value, fn)
    return fn


def available_qlora_impls(impls) -> list:
    """``impls`` without the rows whose libraries cannot be imported (warns), and without the rows of
    the CUDA extension (``EXTENSION_IMPLS``) unless it is built and a GPU is present."""
    impls = list(impls)
    for lib, rows in (("bitsandbytes", ("peft_qlora", "peft_qlora_fa", "bnb_matmul_4bit")),
                      ("peft", ("peft_qlora", "peft_qlora_fa"))):
        if any(i in rows for i in impls):
            try:
                __import__(lib)
            except Exception as e:  # any import failure: the other rows are still worth measuring
                warnings.warn(f"{lib} unavailable ({e!r}); skipping {[i for i in impls if i in rows]}")
                impls = [i for i in impls if i not in rows]
    if any(i in EXTENSION_IMPLS for i in impls):
        from lora_kernels.ops.nf4_gemv import load_extension
        if not (torch.cuda.is_available() and load_extension()):  # a GPU and the built extension
            impls = [i for i in impls if i not in EXTENSION_IMPLS]
    return impls


def _not_applicable(case, provider, device, dtype):
    if provider == "lora_kernels_nf4_fused":
        return fused_forward_not_applicable(case, device, dtype)
    if provider == "lora_kernels_nf4_cuda_dx":
        from lora_kernels.ops import nf4_gemv
        if device.type != "cuda":
            return "CUDA only"
        if case.M > nf4_gemv.GEMV_CHUNKED_MAX_M or case.K % 8:
            return f"the CUDA dX kernel takes M <= {nf4_gemv.GEMV_CHUNKED_MAX_M} and K % 8 == 0 (the row would repeat lora_kernels_nf4)"
        return None
    if provider not in GEMV_IMPLS:
        return None
    from lora_kernels.ops import nf4_gemv
    if device.type != "cuda":
        return "CUDA only"
    if case.M > nf4_gemv.GEMV_CHUNKED_MAX_M:
        return f"M > {nf4_gemv.GEMV_CHUNKED_MAX_M}: the GEMV is not dispatched, the row would repeat lora_kernels_nf4"
    if case.r > nf4_gemv.GEMV_MAX_RANK or dtype not in (torch.float16, torch.bfloat16):
        return f"the GEMV needs fp16/bf16 and r <= {nf4_gemv.GEMV_MAX_RANK}"
    if provider.endswith("_mma"):
        if case.K % nf4_gemv.MMA_K_MULTIPLE:
            return f"the tensor-core GEMV needs K % {nf4_gemv.MMA_K_MULTIPLE} == 0 (the row would repeat the SIMT one)"
        if not nf4_gemv.mma_device_ok(device):
            return "the tensor-core GEMV needs sm_80+ with >= 161 KiB of shared memory per block"
    return None


def _expected(p: QLoRAProblem, provider: str) -> torch.Tensor:
    x = p.x.detach().float()
    y = x @ p.dense.float().t()
    if provider in LORA_IMPLS:
        y = y + p.scale * (x @ p.lora_A.detach().float().t()) @ p.lora_B.detach().float().t()
    return y


def _extras(impl, dy) -> dict:
    saved, _ = memory.saved_activations(impl)
    peak = memory.cuda_peak(impl, dy)[0] if dy.device.type == "cuda" else None
    return {"saved_bytes": saved, "peak_fwdbwd_bytes": peak}


def _shape_info(p: QLoRAProblem) -> dict:
    return {"nf4_bytes": p.qweight.nbytes, "dense_bytes": p.dense.numel() * p.dense.element_size(),
            "bits_per_parameter": p.qweight.bits_per_parameter}


def _finalize(result: dict):
    result["config"]["nf4"] = {"blocksize": 64, "double_quant": True}
    result["goals"] = {"bounds": GOALS, "checks": check_goals(result["rows"] + unmeasured_rows(result, "lora_kernels_nf4")),
                       "device_type": result["metadata"]["device_type"]}


NF4 = Family(
    name="nf4", stem="bench_qlora", title="QLoRA linear (NF4 base)", providers=QLORA_IMPLS, base="base_dense",
    default_peft="peft_qlora", peft_refs=PEFT_REFS, no_lora=("bnb_matmul_4bit", "base_dense"),
    frozen_A=("lora_kernels_nf4_fa", "peft_qlora_fa"), quick_drop=(),
    make_problem=lambda c, device, dtype, seed=0: QLoRAProblem(c.M, c.K, c.N, c.r, device, dtype, seed),
    build=build_qlora_impls,
    tensors=lambda p: [p.x, p.dense, p.lora_A, p.lora_B] + p.quant_tensors(),
    weight_bytes=lambda p, provider: (p.qweight.nbytes if provider in NF4_IMPLS
                                      else p.dense.numel() * p.dense.element_size()),
    expected=_expected, available=available_qlora_impls, not_applicable=_not_applicable,
    extras=_extras, extra_fields=EXTRA_FIELDS, shape_info=_shape_info, finalize=_finalize,
    summary=lambda result: format_goals("QLoRA goals", result["goals"]),
)
QLORA_CSV_FIELDS = csv_fields(PHASES, EXTRA_FIELDS)


def check_goals(rows) -> list:
    """The QLoRA issue's goals evaluated on ``rows`` (meaningful on GPU results only): one entry per
    (goal, shape) with the measured ratio, the bound and whether it is met. Goals whose mode was
    not measured are left out."""
    checks = []
    for r in rows:
        if r["impl"] != "lora_kernels_nf4":
            continue
        cases = [("fwdbwd_vs_peft", "fwdbwd_vs_peft", GOALS["fwdbwd_vs_peft_max"])]
        if 2 <= r["M"] <= 64:
            cases.append(("fwd_vs_peft", "fwd_vs_peft", GOALS["fwd_vs_peft_max"]))
        if r["M"] >= 4096:
            cases.append(("nf4_gemm_vs_dense_fwd", "fwd_vs_base", GOALS["nf4_gemm_vs_dense_fwd_max"]))
        checks += [goal_check(goal, r["shape"], r[key], max=bound) for goal, key, bound in cases if key in r]
    return checks


def run(shapes=None, device=None, dtype=None, reps=None, warmup=None, out=None, impls=None, *, providers=None,
        modes=PHASES, models=None, projs=None, ms=None, ranks=None, quick=False, rep_ms=None, warmup_ms=None,
        plot=True, verbose=True) -> dict:
    """Benchmarks the NF4 providers (``QLORA_IMPLS``, or ``providers`` / its alias ``impls``) over
    ``shapes`` [(M, K, N, r)] or the grid of ``qlora_grid`` (options as ``bench.run``), and writes
    bench_qlora_<dtype>.{json,csv,png} under ``out``. Returns the results dict (metadata, ceilings,
    config, formats, rows, skipped, not_applicable, goal checks)."""
    if impls is not None and providers is not None:
        raise ValueError("give providers or impls (its alias), not both")
    providers = providers if providers is not None else impls
    device, dtype = resolve_device_dtype(device, dtype)
    modes = check_names("modes", modes, ALL_MODES)
    if providers is not None:
        providers = check_names("providers", providers, QLORA_IMPLS)
    cases = resolve_cases(device, qlora_grid, shapes, models, projs, ms, ranks, quick)
    timing = default_timing(quick, reps, warmup, rep_ms, warmup_ms)
    chosen = resolve_providers(NF4, providers, quick)
    if not chosen:
        raise ValueError(f"no NF4 provider left to run (asked for {providers}; see the warnings)")
    # Imported (where it can be) whichever rows run: the lora_kernels rows then take the slab decoder a
    # QLoRA model, which imports it, takes (``ops.bnb_dequantize``: used only once it is imported).
    bitsandbytes_importable()
    return run_family(NF4, cases, device, dtype, chosen, modes, timing, out, plot=plot, verbose=verbose)


# ----------------------------------------------------------------------------- split-K threshold

SWEEP_M = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128)
SPLIT_K_CSV_FIELDS = ["shape", "weight", "M", "split_ms", "no_split_ms", "split_vs_no_split"]


def suggest_threshold(rows, weight: str) -> int:
    """Largest swept M such that split-K is no slower at it and at every smaller swept M, for every
    (K, N) (0: split-K never pays)."""
    best = 0
    for M in sorted({r["M"] for r in rows if r["weight"] == weight}):
        ratios = [r["split_vs_no_split"] for r in rows if r["weight"] == weight and r["M"] == M]
        if not ratios or max(ratios) > 1.0:
            break
        best = M
    return best


def split_k_call(fn, split: bool):
    """A callable running fn() on the Triton GEMM path with the small-M split-K forced on or off.
    The routes that decide before split-K is considered are off: the PyTorch route of small dense
    calls, the CUDA NF4 GEMV and the NF4 cuBLAS slabs (else both modes would time the same code)."""
    from lora_kernels.ops.lora_linear import DENSE_TORCH_MAX_M_ENV
    from lora_kernels.ops.nf4_gemv import NF4_GEMV_ENV
    from lora_kernels.ops.triton_launch import NF4_CUBLAS_MIN_M_ENV, SMALL_M_ENV

    call = with_env(SMALL_M_ENV, 1 << 30 if split else 0, fn)
    for variable in (DENSE_TORCH_MAX_M_ENV, NF4_GEMV_ENV, NF4_CUBLAS_MIN_M_ENV):
        call = with_env(variable, 0, call)
    return call


def split_k_sweep(device=None, dtype=None, ms=SWEEP_M, kns=None, r=RANK, reps=None, warmup=None, out=None,
                  plot=True, verbose=True) -> dict:
    """Inference forward of ``lora_linear`` (dense W) and ``nf4_lora_linear`` with the small-M split-K
    path forced on and off, for each M in ``ms`` and (K, N) in ``kns``; writes
    split_k_<dtype>.{json,csv,png} and suggests ``configs.SMALL_M_MAX`` per weight format. Needs the
    Triton path (CUDA, or CPU with LORA_KERNELS_CPU_BACKEND=triton under the interpreter)."""
    from lora_kernels import lora_linear, nf4_lora_linear
    from lora_kernels.ops import select_backend

    device, dtype = resolve_device_dtype(device, dtype)
    cuda = device.type == "cuda"
    kns = kns or (CUDA_KN if cuda else ((128, 64),))
    # reps / warmup: CPU sample counts; CUDA times with do_bench's default budgets.
    timing = default_timing(reps=3 if reps is None else reps, warmup=warmup if warmup is not None else 1)
    out = Path(out) if out is not None else default_out_dir(device)
    backends = {select_backend(device, M, N, K, r) for (K, N) in kns for M in ms}
    if backends != {"triton"}:
        raise ValueError(f"the split-K sweep needs the Triton path, but {device} takes {sorted(backends)} "
                           "(use a GPU, or LORA_KERNELS_CPU_BACKEND=triton with TRITON_INTERPRET=1)")
    rows = []
    for (K, N) in kns:
        for M in ms:
            p = QLoRAProblem(M, K, N, r, device, dtype)
            x, A, B, q, W, s = p.x.detach(), p.lora_A.detach(), p.lora_B.detach(), p.qweight, p.dense, p.scale
            calls = {"nf4": lambda: nf4_lora_linear(x, q, A, B, s),
                     "dense": lambda: lora_linear(x, W, A, B, s)}
            impls = {}
            for weight, fn in calls.items():
                for mode, split in (("split", True), ("no_split", False)):
                    call = split_k_call(fn, split)
                    impls[f"{weight}:{mode}"] = Impl(f"{weight}:{mode}", call, [], infer=call)
            dy = torch.empty(M, N, device=device, dtype=dtype)
            med = {n: t["infer"] for n, t in measure([impls], [dy], ("infer",), timing).items()}
            for weight in calls:
                split, no_split = med[f"{weight}:split"], med[f"{weight}:no_split"]
                rows.append({"shape": f"{M},{K},{N},{r}", "weight": weight, "M": M, "K": K, "N": N,
                             "split_ms": split, "no_split_ms": no_split, "split_vs_no_split": split / no_split})
            del p, impls
    from lora_kernels.kernels.configs import SMALL_M_MAX
    result = {"metadata": environment_metadata(device, dtype),
              "config": {"timing": timing.describe(device), "statistic": "median", "phase": "infer", "r": r,
                         "current_small_m_max": SMALL_M_MAX},
              "rows": rows,
              "suggested_small_m_max": {w: suggest_threshold(rows, w) for w in ("nf4", "dense")}}
    stem = f"split_k_{result['metadata']['dtype']}"
    write_outputs(result, out, stem, SPLIT_K_CSV_FIELDS, _plot_split_k if plot else None)
    if verbose:
        absolute = absolute_times(result["metadata"])  # else ratios only
        print(f"{'shape M,K,N,r':<20}{'weight':<7}" + (f"{'split ms':>10}{'no split':>10}" if absolute else "")
              + f"{'split ÷ no split':>17}")
        for row in rows:
            print(f"{row['shape']:<20}{row['weight']:<7}"
                  + (f"{row['split_ms']:10.4f}{row['no_split_ms']:10.4f}" if absolute else "")
                  + f"{row['split_vs_no_split']:17.3f}")
        print(f"suggested SMALL_M_MAX: {result['suggested_small_m_max']} (current {SMALL_M_MAX})")
        print(f"wrote {out}/{stem}.{{json,csv,png}}")
    return result


def _plot_split_k(result, path):
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for weight in ("nf4", "dense"):
        for K, N in dict.fromkeys((r["K"], r["N"]) for r in rows):
            pts = [(r["M"], r["split_vs_no_split"]) for r in rows if r["weight"] == weight and (r["K"], r["N"]) == (K, N)]
            ax.plot(*zip(*pts), marker="o", ms=3, label=f"{weight} {K}x{N}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("forward time, split-K / no split")
    ax.legend(fontsize=6)
    meta = result["metadata"]
    ax.set_title(f"small-M split-K, {meta['device']}, {meta['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser):
    """QLoRA bench CLI options (the sweep options of ``bench``, modes default fwd,bwd,fwdbwd,infer)."""
    add_sweep_arguments(parser, QLORA_IMPLS, PHASES)


def run_from_args(args) -> dict:
    return run(**sweep_kwargs(args))


def main(argv=None) -> dict:
    return standalone_main(__doc__, add_arguments, run_from_args, argv)


if __name__ == "__main__":
    main()
