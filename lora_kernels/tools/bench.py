"""Microbenchmark of one LoRA linear layer: ``python -m lora_kernels bench``.

Two families of providers, each timed on the same device, dtype and tensors in the same run:

dense (writes bench_<dtype>.{json,csv,png})
    lora_kernels      ``lora_kernels.lora_linear`` (A and B trainable)
    lora_kernels_fa   the same with lora_A frozen (LoRA-FA)
    lora_kernels_fused  the same as lora_kernels with the one-launch forward switched on (h computed
                      inside the GEMM; sm_90 GPUs, M above the small-M path, padded rank <= 32:
                      "not_applicable" elsewhere)
    lora_kernels_tma  the same as lora_kernels with the TMA GEMMs switched on (forward GEMM above the
                      small-M path, and dX: x / dY and W tiles loaded by the tensor memory
                      accelerator; sm_90 GPUs)
    lora_kernels_triton the same as lora_kernels on the Triton kernels where the default takes the
                      small-M PyTorch route (CUDA, M <= configs.DENSE_TORCH_MAX_M, no dropout)
    lora_kernels_cublas the same as lora_kernels with the cuBLAS base route at every M (x W^T and dY W
                      by cuBLAS, the LoRA terms and biases in the Triton kernels' epilogues; CUDA)
    peft              ``peft.tuners.lora.layer.Linear`` around ``nn.Linear(K, N, bias=False)``
    peft_fa           the same with lora_A frozen
    peft_compiled     ``torch.compile(<peft layer>, dynamic=True)`` (default mode); compiled by the
                      untimed probe; dynamo is reset at every new (K, N) so recompiles never reach
                      its recompile limit (a silent fall-back to eager)
    torch_unfused     ``F.linear(x, W) + scale * F.linear(F.linear(x, A), B)`` under autograd
    base              ``F.linear(x, W)``: the floor (its backward computes dX only)
    opt-in variants (``VARIANT_PROVIDERS``; a sweep with them writes bench_variants_<dtype>.*):
    lora_kernels_dylora, lora_kernels_adalora, peft_dora (PEFT's DoRA layer), lora_kernels_dora
    (that layer patched; compared with peft_dora), lora_kernels_wt (the base weight stored [K, N], as
    transformers' Conv1D holds GPT-2's, passed as its transposed view)
nf4 (writes bench_qlora_<dtype>.*; see ``lora_kernels.tools.qlora_bench``)
    lora_kernels_nf4, lora_kernels_nf4_fa, lora_kernels_nf4_gemv / _gemv_mma (the CUDA C++ decode GEMV's
    SIMT / tensor-core kernel, M <= 64 in launches of 16 rows,
    CUDA with the built extension only), peft_qlora, peft_qlora_fa (lora_A frozen), bnb_matmul_4bit,
    base_dense (the floor)
x requires grad everywhere (a hidden layer); W never does. scale = lora_alpha / r = 2.

Shapes: the projections of Llama-3-8B (hidden 4096, 8 kv heads of 128, intermediate 14336) and
Llama-3-70B (hidden 8192, 8 kv heads of 128, intermediate 28672) as x [M, K] · W [N, K]ᵀ; q/o and
k/v and gate/up share (K, N), so each model has 4 distinct shapes.
Default sweep
    GPU: the 8 distinct (K, N) of 8B and 70B x M in {16, 256, 4096, 8192}, r = 16, bf16, both
         families, every provider; do_bench warm-up 10 ms, rep 30 ms. Estimated 3-4 minutes on an
         H100 (unmeasured), most of it fixed costs: building 70B-sized problems, Triton and
         torch.compile compilation.
    CPU: (K, N) in {(512, 512), (1024, 2048)} x M in {16, 256, 1024}, r = 16, fp32, 10 interleaved
         reps after 2 warm-up reps (about a minute on 2 cores, most of it the first torch.compile).
``--quick`` drops, unless given explicitly: the 70B shapes (GPU) or the second CPU shape, M 256 and
8192 (GPU: M in {16, 4096}; CPU: {16, 256}), the peft_compiled provider (its compilation dominates
small sweeps), and shortens timing (GPU warm-up 5 ms / rep 20 ms; CPU 1 warm-up + 3 reps).

Timing (median of each (provider, mode); ``warm-up`` calls first, so Triton autotuning and
torch.compile never land in a timed call):
    CUDA  fwd, fwdbwd, infer: ``triton.testing.do_bench(return_mode="median")``: it clears L2 before
          every timed call and resets the leaves' gradients (``grad_to_none``). bwd: do_bench cannot
          leave the forward out of a call, so each sample runs an untimed forward, clears L2, then
          times ``y.backward(dy)`` with CUDA events; warm-up and sample count from the same ms
          budgets. When one problem's tensors (x, W or NF4 bytes, adapters, dy) fit in L2, enough
          copies to exceed 2x L2 are allocated and the calls rotate through them.
    CPU   ``time.perf_counter``; providers interleaved rep by rep so that clock or load drift hits
          all of them alike, in a new (seeded) random order each rep so that no row always
          follows the same call; bwd = untimed forward then timed backward.
Gradients are reset to None before every timed call so no provider pays for accumulation.

Metrics per row and mode: ms; TFLOP/s (``FLOP_RULE``); for M <= 16 GB/s of base-weight bytes
(``WEIGHT_BYTES_RULE``); the ratio of the time to the base-only row's and to the like-for-like PEFT
row's (LoRA-FA rows vs peft_fa, NF4 rows vs peft_qlora, NF4 LoRA-FA rows vs peft_qlora_fa) in the
same case: < 1 is faster.
Output: a table on stdout; on stderr one "[i/n] KxN M=.. r=.. <provider> <mode> <ms> ..." line per
(case, provider) for sweeps of 5 or more; <stem>.json (metadata: device, torch / triton / peft /
bitsandbytes versions, git commit, date; config; rows; skipped providers with their errors), .csv
and .png (speed-up vs PEFT and vs base-only against M, one subplot per (K, N)) in ``--out``. Rows
name their provider under "impl".
"""
import argparse
import csv
import datetime
import importlib.metadata
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import lora_kernels
# Shown only from a GPU: absolute times (else ratios to a reference of the same run); goal counts
# with the unmeasured apart. The README's renderer applies the same rules to the result files.
from lora_kernels.tools.report import absolute_times, goal_counts

# The eager dense providers (the memory profile uses these); ``DENSE_PROVIDERS`` adds torch.compile.
ALL_IMPLS = ("lora_kernels", "lora_kernels_fa", "peft", "peft_fa", "torch_unfused", "base")
DENSE_PROVIDERS = ("lora_kernels", "lora_kernels_fa", "lora_kernels_fused", "lora_kernels_tma", "lora_kernels_triton",
                   "lora_kernels_cublas", "peft", "peft_fa", "peft_compiled", "torch_unfused", "base")
# LoRA variants on the fused kernels (opt-in with --providers): their cost over plain lora_kernels is
# reported as ratio_vs_lora_kernels. dylora: rank r out of an r_max = 2r adapter, run on the views
# A[:r], B[:, :r]; adalora: AdaLoRA's SVD form, E [r, 1] folded into A (A ⊙ E) as the PEFT swap-in does;
# peft_dora: PEFT's DoRA layer (magnitude = ||W + s B A||_row: the plain LoRA output), lora_kernels_dora:
# that layer patched by patch_peft_model.
# lora_kernels_wt: the base weight stored [K, N] (transformers' Conv1D: GPT-2's projections, which the
# PEFT patch passes as W.t(), never copied) instead of nn.Linear's [N, K].
VARIANT_PROVIDERS = ("lora_kernels_dylora", "lora_kernels_adalora", "peft_dora", "lora_kernels_dora", "lora_kernels_wt")
VARIANT_REF = "lora_kernels"
# The PEFT row each provider is compared with: like for like in adapter trainability and variant.
PEFT_REF = {"lora_kernels_fa": "peft_fa", "peft_fa": "peft_fa", "lora_kernels_dora": "peft_dora",
            "peft_dora": "peft_dora"}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
MODES = ("fwd", "bwd", "fwdbwd")          # training modes: the bench default
ALL_MODES = MODES + ("infer",)            # infer: forward under torch.no_grad(), x without grad
FAMILIES = ("dense", "nf4")

# Llama-3 projection shapes: x [M, K] · W [N, K]^T.
LLAMA3 = {"8b": {"hidden": 4096, "kv": 8 * 128, "intermediate": 14336},
          "70b": {"hidden": 8192, "kv": 8 * 128, "intermediate": 28672}}
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
RANK = 16
CUDA_M = (16, 256, 4096, 8192)
QUICK_CUDA_M = (16, 4096)
CPU_KN = ((512, 512), (1024, 2048))
CPU_M = (16, 256, 1024)
# The CPU goal case of the fused-LoRA issue (fp32): in the default CPU sweep, so the committed
# results check it.
CPU_GOAL_CASES = ((2048, 1024, 1024, 16),)
QUICK_CPU_M = (16, 256)
WEIGHT_BOUND_M = 16  # rows up to which the weight read dominates: GB/s is reported
PROGRESS_MIN_ITEMS = 5  # progress lines only for sweeps of at least this many (case, provider) items
ROTATION_MAX_COPIES = 64
L2_FLUSH_BYTES = 256 << 20  # cleared before each timed backward, as large as do_bench's cache buffer

FLOP_RULE = ("work the layer needs, per call: fwd = 2MNK + 2Mr(K+N) (LoRA); bwd = 2MNK (dX; W is frozen, "
             "so no dW) + 4MNr (dH, dB) + 2MKr (dX LoRA) + 2MKr (dA, only when lora_A is trainable); "
             "fwdbwd = fwd + bwd; infer = fwd; base-only rows (base, base_dense, bnb_matmul_4bit) count "
             "the 2MNK terms only")
WEIGHT_BYTES_RULE = ("rows with M <= 16: bytes of the base weight (dense: N*K*itemsize; NF4: packed codes + "
                     "absmax statistics + code tables) x reads per call (fwd 1, bwd 1, fwdbwd 2, infer 1) / time")


# ----------------------------------------------------------------------------- environment

def _pkg_version(name: str) -> Optional[str]:
    # Metadata, not import: importing bitsandbytes on a machine without its native library
    # prints warnings and can be slow; the installed version is what the record needs.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str:
    """Short HEAD commit, with "-dirty" when tracked files differ from it (a copy of a working tree
    can carry a stale .git: then ``source_hash`` still says which code ran)."""
    cwd = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10, cwd=cwd)
        if out.returncode != 0 or not out.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=30, cwd=cwd)
        return out.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_hash() -> str:
    """SHA-1 (12 hex digits) of the package's Python sources and csrc/ (paths and contents, sorted): the
    code a result was measured with, whatever git says (``git ls-files lora_kernels csrc | sort`` and
    the same hashing give it for any commit)."""
    import hashlib
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha1()
    files = sorted(p for pattern in ("lora_kernels/**/*.py", "csrc/*") for p in root.glob(pattern) if p.is_file())
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _cpu_model() -> str:
    # platform.processor() is empty on many Linux builds; /proc/cpuinfo has the marketing name.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    """Human-readable name of ``device``: the GPU name, or the CPU model followed by "(cpu)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} (cpu)"


def device_slug(device: torch.device) -> str:
    """Directory-safe device kind: "cpu", or the GPU name slugged (e.g. "nvidia-h100-80gb-hbm3")."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def default_out_dir(device: torch.device) -> Path:
    """``benchmarks/results/<device-kind>/`` relative to the working directory."""
    return Path("benchmarks") / "results" / device_slug(device)


def environment_metadata(device="cpu", dtype: Optional[torch.dtype] = None) -> dict:
    """What a result depends on: device, library versions, git commit, UTC date, dtype, threads."""
    device = torch.device(device)
    meta = {
        "device": device_name(device),
        "device_type": device.type,
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "torch": torch.__version__,
        "triton": _pkg_version("triton"),
        "bitsandbytes": _pkg_version("bitsandbytes"),
        "peft": _pkg_version("peft"),
        "lora_kernels": lora_kernels.__version__,
        "git_commit": _git_commit(),
        "source_hash": source_hash(),
        "utc_date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_num_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
    return meta


# ----------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class Case:
    """One problem size: x [M, K], weight [N, K], rank r."""
    M: int
    K: int
    N: int
    r: int

    @property
    def shape(self) -> str:
        return f"{self.M},{self.K},{self.N},{self.r}"

    @property
    def label(self) -> str:
        """The Llama-3 projections with this (K, N), e.g. "8b q,o" ("" for other shapes)."""
        return shape_label(self.K, self.N)


def projection_kn(model: str, proj: str) -> tuple:
    """(K, N) of projection ``proj`` (one of ``PROJECTIONS``) of Llama-3 ``model`` ("8b" or "70b")."""
    if model not in LLAMA3:
        raise ValueError(f"model must be one of {sorted(LLAMA3)}, got {model!r}")
    h, kv, inter = (LLAMA3[model][k] for k in ("hidden", "kv", "intermediate"))
    kns = {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, inter), "up": (h, inter),
           "down": (inter, h)}
    if proj not in kns:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {proj!r}")
    return kns[proj]


def model_shapes(models=tuple(LLAMA3), projs=PROJECTIONS) -> list:
    """Distinct (K, N) of the chosen projections of the chosen models, in model then projection order
    (projections sharing a shape, q/o, k/v, gate/up, give one entry)."""
    return list(dict.fromkeys(projection_kn(m, p) for m in models for p in projs))


def shape_label(K: int, N: int) -> str:
    """"8b q,o"-style name of the Llama-3 projections whose weight is [N, K]; "" if none."""
    names = [f"{m} {','.join(p for p in PROJECTIONS if projection_kn(m, p) == (K, N))}"
             for m in LLAMA3 if any(projection_kn(m, p) == (K, N) for p in PROJECTIONS)]
    return "; ".join(names)


def make_cases(kns, ms, ranks) -> list:
    """Cases for every (K, N) in ``kns``, rank in ``ranks`` and M in ``ms``, in that nesting order."""
    return [Case(M, K, N, r) for (K, N) in kns for r in ranks for M in ms]


def _positive_ints(name: str, values) -> tuple:
    values = tuple(values)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"{name} must be a non-empty list of positive integers, got {list(values)}")
    return values


def resolve_cases(device, default_grid: Callable, shapes=None, models=None, projs=None, ms=None, ranks=None,
                  quick: bool = False) -> list:
    """The cases of a sweep. ``shapes`` ([(M, K, N, r)]) is used as given and excludes the other
    options. Otherwise (K, N) come from ``models`` / ``projs`` (each defaulting to all when the other
    is given) or from ``default_grid(device, quick) -> (kns, ms)``; ``ms`` and ``ranks`` (default
    (16,)) replace the grid's M values and rank."""
    if shapes is not None:
        if any(v is not None for v in (models, projs, ms, ranks)):
            raise ValueError("shapes gives explicit M,K,N,r: do not combine it with models, projs, ms or ranks")
        if any(len(s) != 4 for s in shapes):
            raise ValueError(f"shapes entries must be (M, K, N, r), got {list(shapes)}")
        cases = [Case(*_positive_ints("shapes entry", s)) for s in shapes]
        if not cases:
            raise ValueError("shapes is empty")
        return cases
    grid_kns, grid_ms = default_grid(torch.device(device), quick)
    if models is not None or projs is not None:
        models = tuple(models) if models is not None else tuple(LLAMA3)
        projs = tuple(projs) if projs is not None else PROJECTIONS
        bad = [m for m in models if m not in LLAMA3] + [p for p in projs if p not in PROJECTIONS]
        if bad or not models or not projs:
            raise ValueError(f"models must be among {sorted(LLAMA3)} and projs among {PROJECTIONS}; got "
                             f"models={list(models)}, projs={list(projs)}")
        kns = model_shapes(models, projs)
    else:
        kns = grid_kns
    ms = _positive_ints("ms", ms) if ms is not None else tuple(grid_ms)
    ranks = _positive_ints("ranks", ranks) if ranks is not None else (RANK,)
    return make_cases(kns, ms, ranks)


def default_extra_cases(device: torch.device, quick: bool = False) -> list:
    """Cases the default sweep adds to its grid: the CPU goal case (not in --quick)."""
    return [] if quick or device.type != "cpu" else [Case(*c) for c in CPU_GOAL_CASES]


def bench_grid(device: torch.device, quick: bool = False) -> tuple:
    """Default (kns, ms) of ``bench``: Llama-3 8B + 70B projections on a GPU (8B only when quick),
    small shapes on CPU."""
    if device.type == "cuda":
        return model_shapes(("8b",) if quick else tuple(LLAMA3)), QUICK_CUDA_M if quick else CUDA_M
    return (CPU_KN[:1] if quick else CPU_KN), QUICK_CPU_M if quick else CPU_M


# ----------------------------------------------------------------------------- providers

@dataclass
class Impl:
    """One provider on one problem: ``forward()`` returns y [M, N]; ``leaves`` get gradients;
    ``params`` are weight/adapter tensors (excluded from activation accounting); ``infer()``, if
    given, is the inference forward (no autograd graph, x without grad)."""
    name: str
    forward: Callable[[], torch.Tensor]
    leaves: list
    params: list = field(default_factory=list)
    infer: Optional[Callable[[], torch.Tensor]] = None
    # fn -> a callable running fn() inside some setting (e.g. ``tma_gemms``: a dispatch switch the
    # backward must see too): wraps forward and infer here, and every ``backward`` call.
    around: Optional[Callable[[Callable], Callable]] = None

    def __post_init__(self):
        if self.around is not None:
            self.forward = self.around(self.forward)
            if self.infer is not None:
                self.infer = self.around(self.infer)

    def backward(self, y: torch.Tensor, dy: torch.Tensor) -> None:
        """y.backward(dy), inside ``around`` when given."""
        if self.around is None:
            y.backward(dy)
        else:
            self.around(lambda: y.backward(dy))()


@dataclass
class Problem:
    """Shared tensors: x [M, K] (requires grad), weight [N, K] (frozen), lora_A [r, K], lora_B [N, r]."""
    x: torch.Tensor
    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float
    r: int


def random_factory(device, dtype, seed: int = 0) -> Callable:
    """``rand(*shape, std=1.0)``: seeded normal tensors on ``device`` in ``dtype``. On CPU from a CPU
    generator; on other devices from a generator on the device (drawing a 70B-sized weight on the
    host and copying it would dominate a GPU sweep)."""
    device = torch.device(device)
    if device.type == "cpu":
        g = torch.Generator(device="cpu").manual_seed(seed)

        def rand(*shape, std=1.0):
            return (torch.randn(*shape, generator=g) * std).to(dtype=dtype)
        return rand
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, std=1.0):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).mul_(std).to(dtype)
    return rand


def make_problem(M: int, K: int, N: int, r: int, device, dtype, seed: int = 0) -> Problem:
    """Random problem for x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r] (B random, not zero,
    so the LoRA branch does real work); scale = lora_alpha / r with lora_alpha = 2r."""
    rand = random_factory(device, dtype, seed)
    x = rand(M, K).to(device).requires_grad_(True)
    weight = rand(N, K, std=K ** -0.5).to(device)
    lora_A = rand(r, K, std=K ** -0.5).to(device).requires_grad_(True)
    lora_B = rand(N, r, std=r ** -0.5).to(device).requires_grad_(True)
    return Problem(x, weight, lora_A, lora_B, scale=2.0, r=r)


def _peft_linear(p: Problem, dropout_p: float, freeze_A: bool, dora: bool = False):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    from lora_kernels.integrations.peft import build_peft_layer

    N, K = p.weight.shape
    base = torch.nn.Linear(K, N, bias=False, device=p.weight.device, dtype=p.weight.dtype)
    # Share storage with the problem's weight so every provider reads the same bytes.
    base.weight = torch.nn.Parameter(p.weight, requires_grad=False)
    alpha = 2 * p.r
    cfg = LoraConfig(r=p.r, lora_alpha=alpha, lora_dropout=dropout_p, use_dora=dora)
    layer = build_peft_layer(LoraLinear, base, cfg, r=p.r, lora_alpha=alpha)
    layer.to(device=p.weight.device, dtype=p.weight.dtype)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        a.copy_(p.lora_A)
        b.copy_(p.lora_B)
    a.requires_grad_(not freeze_A)
    leaves = [p.x, b] + ([] if freeze_A else [a])
    params = [base.weight, a, b]
    if dora:
        # magnitude = ||W + s B A||_row, as DoRA initialises it: g = 1, the output is the plain LoRA one
        magnitude = layer.lora_magnitude_vector["default"].weight
        with torch.no_grad():
            delta = p.weight.float() + p.scale * (p.lora_B.detach().float() @ p.lora_A.detach().float())
            magnitude.copy_(torch.linalg.norm(delta, dim=1))
        leaves.append(magnitude)
        params.append(magnitude)
    layer.train(True)
    return layer, leaves, params


def build_impls(p: Problem, impls=ALL_IMPLS, dropout_p: float = 0.0) -> dict:
    """name -> Impl for the requested provider names (see ``DENSE_PROVIDERS``). With dropout_p > 0
    every LoRA provider drops x in its LoRA branch (training mode)."""
    from lora_kernels import lora_linear

    unknown = set(impls) - set(DENSE_PROVIDERS + VARIANT_PROVIDERS)
    if unknown:
        raise ValueError(f"unknown implementations {sorted(unknown)}; "
                         f"choose from {DENSE_PROVIDERS + VARIANT_PROVIDERS}")
    x, W, A, B, s = p.x, p.weight, p.lora_A, p.lora_B, p.scale
    x_infer, A_frozen = x.detach(), A.detach()  # same storage, no grad (LoRA-FA: A frozen)
    params = [W, A, B]
    out = {}
    for name in impls:
        if name == "lora_kernels":
            out[name] = Impl(name, lambda: lora_linear(x, W, A, B, s, dropout_p=dropout_p), [x, A, B], params,
                             infer=lambda: lora_linear(x_infer, W, A, B, s))
        elif name == "lora_kernels_fa":
            out[name] = Impl(name, lambda: lora_linear(x, W, A_frozen, B, s, dropout_p=dropout_p), [x, B], params,
                             infer=lambda: lora_linear(x_infer, W, A_frozen, B, s))
        elif name in ("lora_kernels_fused", "lora_kernels_tma", "lora_kernels_triton", "lora_kernels_cublas"):
            around = {"lora_kernels_fused": fused_forward, "lora_kernels_tma": tma_gemms,
                      "lora_kernels_triton": triton_route, "lora_kernels_cublas": cublas_base}[name]
            out[name] = Impl(name, lambda: lora_linear(x, W, A, B, s, dropout_p=dropout_p), [x, A, B], params,
                             infer=lambda: lora_linear(x_infer, W, A, B, s), around=around)
        elif name in ("peft_dora", "lora_kernels_dora"):
            layer, leaves, pparams = _peft_linear(p, dropout_p, freeze_A=False, dora=True)
            if name == "lora_kernels_dora":
                lora_kernels.patch_peft_model(layer)
            out[name] = Impl(name, lambda layer=layer: layer(x), leaves, params + pparams,
                             infer=lambda layer=layer: layer(x_infer))
        elif name in ("peft", "peft_fa", "peft_compiled"):
            layer, leaves, pparams = _peft_linear(p, dropout_p, freeze_A=name == "peft_fa")
            if name == "peft_compiled":
                # dynamic=True: one graph serves every M of a (K, N); see the module docstring.
                layer = torch.compile(layer, dynamic=True)
            out[name] = Impl(name, lambda layer=layer: layer(x), leaves, params + pparams,
                             infer=lambda layer=layer: layer(x_infer))
        elif name == "torch_unfused":
            def unfused(x=x, training=True):
                xd = F.dropout(x, dropout_p, training=True) if dropout_p > 0 and training else x
                return F.linear(x, W) + s * F.linear(F.linear(xd, A), B)
            out[name] = Impl(name, unfused, [x, A, B], params, infer=lambda: unfused(x_infer, training=False))
        elif name == "base":
            out[name] = Impl(name, lambda: F.linear(x, W), [x], params, infer=lambda: F.linear(x_infer, W))
        elif name == "lora_kernels_dylora":
            r = p.r  # the active rank of a 2r adapter whose first r ranks are the problem's A and B
            A_max = torch.cat([A.detach(), torch.randn_like(A)]).requires_grad_(True)
            B_max = torch.cat([B.detach(), torch.randn_like(B)], dim=1).requires_grad_(True)
            out[name] = Impl(name, lambda: lora_linear(x, W, A_max[:r], B_max[:, :r], s, dropout_p=dropout_p),
                             [x, A_max, B_max], [W, A_max, B_max],
                             infer=lambda: lora_linear(x_infer, W, A_max[:r], B_max[:, :r], s))
        elif name == "lora_kernels_wt":
            W_kn = W.detach().t().contiguous()  # the [K, N] storage of a Conv1D; the kernels get its view
            W_t = W_kn.t()
            out[name] = Impl(name, lambda: lora_linear(x, W_t, A, B, s, dropout_p=dropout_p), [x, A, B],
                             [W_kn, A, B], infer=lambda: lora_linear(x_infer, W_t, A, B, s))
        elif name == "lora_kernels_adalora":
            E = torch.ones(p.r, 1, device=A.device, dtype=A.dtype, requires_grad=True)  # A ⊙ 1 = A: same output
            out[name] = Impl(name, lambda: lora_linear(x, W, A * E, B, s, dropout_p=dropout_p), [x, A, B, E],
                             params + [E], infer=lambda: lora_linear(x_infer, W, A * E, B, s))
    return out


def with_env(name: str, value, fn):
    """A callable running fn() with environment variable ``name`` set to ``value`` (the dispatch
    overrides of lora_kernels are read per call)."""
    def call():
        old = os.environ.get(name)
        os.environ[name] = str(value)
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old
    return call


def fused_forward(fn):
    """fn() with the one-launch forward switched on for every M it supports."""
    from lora_kernels.ops.triton_launch import FUSED_MIN_M_ENV
    return with_env(FUSED_MIN_M_ENV, 1, fn)


def tma_gemms(fn):
    """fn() with the TMA GEMMs (forward and dX) switched on for every M (on the Triton route)."""
    from lora_kernels.ops.triton_launch import TMA_MIN_M_ENV
    return triton_route(with_env(TMA_MIN_M_ENV, 1, fn))


def cublas_base(fn):
    """fn() with the cuBLAS base route switched on for every M (on the Triton route)."""
    from lora_kernels.ops.triton_launch import DENSE_CUBLAS_MIN_M_ENV
    return triton_route(with_env(DENSE_CUBLAS_MIN_M_ENV, 1, fn))


def cublas_base_not_applicable(case, device, dtype) -> Optional[str]:
    """Why the cuBLAS base route would not run for ``case``: it is a route of the Triton backend, which
    CPU tensors take only under the interpreter (not a timing anyone needs)."""
    return "the cuBLAS base route is timed on CUDA only" if device.type != "cuda" else None


def triton_route(fn):
    """fn() with dense CUDA calls on the Triton kernels at every M (no small-M PyTorch route)."""
    from lora_kernels.ops.lora_linear import DENSE_TORCH_MAX_M_ENV
    return with_env(DENSE_TORCH_MAX_M_ENV, 0, fn)


def triton_route_not_applicable(case, device, dtype) -> Optional[str]:
    """Why the default lora_kernels row already runs the Triton kernels for ``case`` (this row would
    repeat it)."""
    from lora_kernels.kernels import configs
    if device.type != "cuda":
        return "the small-M PyTorch route is for CUDA tensors only"
    if case.M > configs.DENSE_TORCH_MAX_M:
        return f"M above {configs.DENSE_TORCH_MAX_M}: the default runs the Triton kernels"
    return None


def tma_not_applicable(case, device, dtype) -> Optional[str]:
    """Why neither TMA GEMM would run for ``case`` (its row would repeat the default one). At small M
    the forward keeps its split-K path, but the dX GEMM still takes TMA."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return "the TMA GEMMs run on sm_90 GPUs only"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "exact fp32 dots (FMA) are not supported by the TMA GEMMs"
    if (case.K * dtype.itemsize) % 16:
        return "rows of x and W not 16-byte aligned (TMA)"
    return None


def fused_forward_not_applicable(case, device, dtype) -> Optional[str]:
    """Why the one-launch forward would not run for ``case`` (its row would repeat the two-launch one)."""
    from lora_kernels.kernels import configs
    from lora_kernels.ops.triton_launch import small_m_max

    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return "the one-launch forward runs on sm_90 GPUs only"
    if case.M <= small_m_max():
        return "M in the small-M split-K range"
    if configs.padded_rank(case.r) > configs.FUSED_MAX_PADDED_RANK:
        return f"padded rank above {configs.FUSED_MAX_PADDED_RANK}"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "exact fp32 dots (FMA) are not supported by the one-launch forward"
    return None


def available_impls(impls) -> list:
    """``impls`` without the PEFT rows when peft cannot be imported (warns)."""
    impls = list(impls)
    if any(i.startswith("peft") for i in impls):
        try:
            import peft.tuners.lora.layer  # noqa: F401
        except Exception as e:  # any import failure: the other rows are still worth measuring
            warnings.warn(f"peft unavailable ({e!r}); skipping PEFT rows")
            impls = [i for i in impls if not i.startswith("peft")]
    return impls


def probe(impl: Impl, dy: torch.Tensor) -> Optional[str]:
    """Runs one fwd+bwd of ``impl`` (dy [M, N]); returns None, or the error as text."""
    try:
        _reset_grads(impl)
        impl.backward(impl.forward(), dy)
        _reset_grads(impl)
        return None
    except Exception as e:  # report any failure of the provider under test, keep going
        return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


@dataclass
class Family:
    """A table of providers over one kind of problem (dense or NF4 base weight).

    make_problem(case, device, dtype, seed) -> problem; build(problem, names) -> {name: Impl};
    tensors(problem) -> the tensors one call reads (for the L2 rotation); weight_bytes(problem,
    provider) -> base-weight bytes one pass reads; expected(problem, provider) -> fp32 reference
    output [M, N]; available(names) -> the names whose libraries import; not_applicable(case,
    provider, device, dtype) -> reason or None; extras(impl, dy) -> extra row fields; shape_info(
    problem) -> per-(K, N) facts; finalize(result) adds sections; summary(result) -> text to print.
    """
    name: str
    stem: str
    title: str
    providers: tuple
    base: str
    default_peft: str
    peft_refs: dict
    no_lora: tuple       # providers computing the base matmul only
    frozen_A: tuple      # providers with lora_A frozen (no dA)
    quick_drop: tuple    # providers left out of --quick unless asked for
    make_problem: Callable
    build: Callable
    tensors: Callable
    weight_bytes: Callable
    expected: Callable
    available: Callable
    not_applicable: Optional[Callable] = None
    extras: Optional[Callable] = None
    extra_fields: tuple = ()
    shape_info: Optional[Callable] = None
    finalize: Optional[Callable] = None
    summary: Optional[Callable] = None
    optional: tuple = ()  # valid providers that run only when asked for (--providers)

    def peft_ref(self, provider: str) -> str:
        return self.peft_refs.get(provider, self.default_peft)


def goal_check(goal: str, shape, value, *, max=None, min=None, strict: bool = False,
               device: str = "cuda") -> dict:
    """One goal check of a measured ratio: met when ``value`` <= ``max`` / >= ``min`` (< / > when
    ``strict``), None when it was not measured. ``device``: where the goal applies ("cuda" for the
    GPU goals, "cpu" for the CPU ones)."""
    if (max is None) == (min is None):
        raise ValueError("goal_check takes exactly one of max and min")
    if value is None:
        met = None
    elif max is not None:
        met = value < max if strict else value <= max
    else:
        met = value > min if strict else value >= min
    check = {"goal": goal, "shape": shape, "ratio": value, "met": met, "device": device}
    check.update({"max": max} if max is not None else {"min": min})
    if strict:
        check["strict"] = True
    return check


def format_goals(title: str, goals: dict, limit: int = 20) -> str:
    """"<title>: k/n met[, u not measured]", a note when a CPU run checks GPU goals, then each check
    not met or not measured."""
    checks = goals["checks"]
    if not checks:
        return f"{title}: none checked"
    head = f"{title}: {goal_counts(checks)}"
    if goals["device_type"] != "cuda" and any(c.get("device", "cuda") == "cuda" for c in checks):
        head += " (CPU run: the goals are GPU goals, shown for completeness)"
    missed = []
    for c in checks:
        if c["met"]:
            continue
        op = ("<" if c.get("strict") else "<=") if "max" in c else (">" if c.get("strict") else ">=")
        missed.append(f"  {c['goal']} at {c.get('shape')}: {fmt_num(c['ratio'], '.3f')} "
                      f"(goal {op} {c['max'] if 'max' in c else c['min']:.3f}) "
                      + ("not measured" if c["met"] is None else "NOT met"))
    return "\n".join([head] + missed[:limit] + (["  ..."] if len(missed) > limit else []))


def unmeasured_rows(result: dict, provider: str) -> list:
    """Stand-in rows (every ratio None) for the swept cases in which ``provider`` was asked for but has
    no row (it failed: "skipped"; or "not_applicable"): goal checks then count those cases as not
    measured instead of leaving them out, which would make "1 of 1 met" of a goal set at 3 shapes."""
    if provider not in result["config"].get("impls", ()):
        return []
    have = {r["shape"] for r in result["rows"] if r["impl"] == provider}
    shapes = dict.fromkeys([*(r["shape"] for r in result["rows"]), *result.get("skipped", {}),
                            *result.get("not_applicable", {})])
    modes = result["config"].get("modes", ())
    rows = []
    for shape in shapes:
        if shape in have:
            continue
        M, K, N, r = (int(v) for v in shape.split(","))
        rows.append({"impl": provider, "shape": shape, "M": M, "K": K, "N": N, "r": r,
                     **{f"{mode}_vs_{ref}": None for mode in modes for ref in ("base", "peft")}})
    return rows


# Goals of the fused-LoRA issue; ratios of medians measured in the same run (lora_kernels / reference).
DENSE_GOALS = {
    "cpu": {"cases": CPU_GOAL_CASES, "dtype": "float32",
            "fwdbwd_vs_base_max": 1.10,   # fwd+bwd within 1.10x the base-only matmul's fwd+bwd
            "fwdbwd_vs_peft_below": 1.0},  # and faster than PEFT
    "cuda": {"M": 8192, "kn": ((4096, 4096), (4096, 14336), (14336, 4096)), "r": 16, "dtype": "bfloat16",
             "fwd_vs_base_max": 1.05,      # forward <= 1.05x the base-only cuBLAS matmul
             "fwdbwd_vs_peft_max": 1 / 1.5},  # fwd+bwd >= 1.5x faster than PEFT
}


def check_dense_goals(rows, device_type: str, dtype: str) -> list:
    """The fused-LoRA issue's goals for ``device_type`` on the lora_kernels rows of its cases (a mode
    that was not measured leaves its goals out)."""
    spec = DENSE_GOALS.get(device_type)
    if spec is None or dtype != spec["dtype"]:
        return []
    checks = []
    for r in rows:
        if r["impl"] != "lora_kernels":
            continue
        if device_type == "cpu" and (r["M"], r["K"], r["N"], r["r"]) in spec["cases"]:
            goals = [("fwdbwd_vs_base", dict(max=spec["fwdbwd_vs_base_max"])),
                     ("fwdbwd_vs_peft", dict(max=spec["fwdbwd_vs_peft_below"], strict=True))]
        elif device_type == "cuda" and (r["M"], r["r"]) == (spec["M"], spec["r"]) and (r["K"], r["N"]) in spec["kn"]:
            goals = [("fwd_vs_base", dict(max=spec["fwd_vs_base_max"])),
                     ("fwdbwd_vs_peft", dict(max=spec["fwdbwd_vs_peft_max"]))]
        else:
            continue
        checks += [goal_check(key, r["shape"], r[key], device=device_type, **bound)
                   for key, bound in goals if key in r]
    return checks


def _dense_finalize(result: dict):
    meta = result["metadata"]
    rows = result["rows"] + unmeasured_rows(result, "lora_kernels")
    result["goals"] = {"bounds": DENSE_GOALS, "device_type": meta["device_type"],
                       "checks": check_dense_goals(rows, meta["device_type"], meta["dtype"])}


def _dense_expected(p: Problem, provider: str) -> torch.Tensor:
    x = p.x.detach().float()
    y = x @ p.weight.float().t()
    if provider != "base":
        y = y + p.scale * (x @ p.lora_A.detach().float().t()) @ p.lora_B.detach().float().t()
    return y


DENSE = Family(
    name="dense", stem="bench", title="LoRA linear", providers=DENSE_PROVIDERS, base="base", default_peft="peft",
    peft_refs=PEFT_REF, no_lora=("base",), optional=VARIANT_PROVIDERS, frozen_A=("lora_kernels_fa", "peft_fa"),
    quick_drop=("peft_compiled",), extra_fields=("ratio_vs_lora_kernels",),
    make_problem=lambda c, device, dtype, seed=0: make_problem(c.M, c.K, c.N, c.r, device, dtype, seed),
    build=build_impls,
    tensors=lambda p: [p.x, p.weight, p.lora_A, p.lora_B],
    weight_bytes=lambda p, provider: p.weight.numel() * p.weight.element_size(),
    expected=_dense_expected,
    available=available_impls,
    not_applicable=lambda case, provider, device, dtype: (
        fused_forward_not_applicable(case, device, dtype) if provider == "lora_kernels_fused"
        else tma_not_applicable(case, device, dtype) if provider == "lora_kernels_tma"
        else triton_route_not_applicable(case, device, dtype) if provider == "lora_kernels_triton"
        else cublas_base_not_applicable(case, device, dtype) if provider == "lora_kernels_cublas" else None),
    finalize=_dense_finalize,
    summary=lambda result: format_goals("fused LoRA goals", result["goals"]),
)


def get_family(name: str) -> Family:
    """The ``Family`` called ``name`` ("dense" or "nf4")."""
    if name == "dense":
        return DENSE
    if name == "nf4":
        from lora_kernels.tools import qlora_bench  # imports this module: resolved lazily
        return qlora_bench.NF4
    raise ValueError(f"family must be one of {FAMILIES}, got {name!r}")


# ----------------------------------------------------------------------------- metrics

def flops(case: Case, family: Family, provider: str, mode: str) -> float:
    """Floating-point operations of one call (``FLOP_RULE``)."""
    M, K, N, r = case.M, case.K, case.N, case.r
    lora = provider not in family.no_lora
    fwd = 2 * M * N * K + (2 * M * r * (K + N) if lora else 0)
    bwd = 2 * M * N * K
    if lora:
        bwd += 4 * M * N * r + 2 * M * K * r + (0 if provider in family.frozen_A else 2 * M * K * r)
    return {"fwd": fwd, "infer": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


WEIGHT_READS = {"fwd": 1, "bwd": 1, "fwdbwd": 2, "infer": 1}


def ratio(a, b):
    """a / b, or None when either is missing (or b is 0)."""
    return a / b if a is not None and b else None


def main_mode(modes) -> str:
    """The mode summarised in tables, plots and ``ratio_vs_*``: fwdbwd when measured."""
    return "fwdbwd" if "fwdbwd" in modes else list(modes)[0]


def csv_fields(modes, extra_fields=()) -> list:
    """CSV columns of a sweep over ``modes``."""
    fields = ["family", "label", "shape", "M", "K", "N", "r", "impl"]
    for m in modes:
        fields += [f"{m}_ms", f"{m}_TFLOPs", f"{m}_GBps", f"{m}_vs_base", f"{m}_vs_peft"]
    return fields + ["base_ref", "peft_ref", "ratio_vs_base", "ratio_vs_peft", "out_rel_err", *extra_fields]


BENCH_CSV_FIELDS = csv_fields(MODES)


def make_row(family: Family, case: Case, provider: str, med: dict, weight_bytes: int, modes) -> dict:
    """One result row: ms, TFLOP/s, GB/s (M <= WEIGHT_BOUND_M) and ratios per mode. ``med`` is
    {provider: {mode: median ms}} of every provider measured on this case."""
    base = family.base if family.base in med else None
    peft = family.peft_ref(provider)
    peft = peft if peft in med else None
    row = {"family": family.name, "label": case.label, "shape": case.shape, "M": case.M, "K": case.K,
           "N": case.N, "r": case.r, "impl": provider}
    for m in modes:
        t = med[provider][m]
        row[f"{m}_ms"] = t
        row[f"{m}_TFLOPs"] = flops(case, family, provider, m) / (t * 1e9)
        row[f"{m}_GBps"] = weight_bytes * WEIGHT_READS[m] / (t * 1e6) if case.M <= WEIGHT_BOUND_M else None
        row[f"{m}_vs_base"] = ratio(t, med[base][m]) if base else None
        row[f"{m}_vs_peft"] = ratio(t, med[peft][m]) if peft else None
    main = main_mode(modes)
    row.update(base_ref=base, peft_ref=peft, ratio_vs_base=row[f"{main}_vs_base"],
               ratio_vs_peft=row[f"{main}_vs_peft"])
    if provider in family.optional and VARIANT_REF in med:  # a variant's cost over plain fused LoRA
        row["ratio_vs_lora_kernels"] = ratio(med[provider][main], med[VARIANT_REF][main])
    return row


# ----------------------------------------------------------------------------- timing

@dataclass
class Timing:
    """How each (provider, mode) is timed. CPU: ``warmup`` untimed then ``reps`` timed samples,
    providers interleaved sample by sample. CUDA: ``do_bench(warmup=warmup_ms, rep=rep_ms)``; the
    bwd sampler uses the same budgets and at most ``max_bwd_samples`` samples."""
    reps: int
    warmup: int
    rep_ms: float
    warmup_ms: float
    max_bwd_samples: int = 1000

    def describe(self, device: torch.device) -> dict:
        if device.type == "cuda":
            return {"timer": "triton.testing.do_bench(return_mode='median'), L2 cleared before every timed call",
                    "warmup_ms": self.warmup_ms, "rep_ms": self.rep_ms,
                    "bwd": "untimed forward, L2 cleared, y.backward(dy) timed with CUDA events; same ms "
                           f"budgets over whole samples, at most {self.max_bwd_samples} samples",
                    "statistic": "median"}
        return {"timer": "time.perf_counter, providers interleaved rep by rep in a seeded random order",
                "reps": self.reps,
                "warmup": self.warmup, "bwd": "untimed forward, then timed backward", "statistic": "median"}


def default_timing(quick: bool = False, reps=None, warmup=None, rep_ms=None, warmup_ms=None) -> Timing:
    """Timing defaults (module docstring): CPU sample counts and CUDA ms budgets; any value given
    overrides its default."""
    t = Timing(reps=3 if quick else 10, warmup=1 if quick else 2, rep_ms=20.0 if quick else 30.0,
               warmup_ms=5.0 if quick else 10.0)
    for name, value in (("reps", reps), ("warmup", warmup), ("rep_ms", rep_ms), ("warmup_ms", warmup_ms)):
        if value is not None:
            if value < (1 if name in ("reps", "rep_ms") else 0):
                raise ValueError(f"{name} must be {'>= 1' if name in ('reps', 'rep_ms') else '>= 0'}, got {value}")
            setattr(t, name, value)
    return t


def _reset_grads(impl: Impl):
    for t in impl.leaves:
        t.grad = None


def _sample(fn, setup, device, flush: Optional[torch.Tensor]):
    """Runs ``setup()`` untimed, times ``fn(state)``; returns a callable giving milliseconds
    (CUDA events are read only after the caller synchronises)."""
    state = setup()
    if flush is not None:
        flush.zero_()  # evict L2 so every sample starts cold
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn(state)
        end.record()
        del result
        return lambda: start.elapsed_time(end)
    t0 = time.perf_counter()
    result = fn(state)
    dt = (time.perf_counter() - t0) * 1e3
    del result  # outside the timed region: freeing the graph is not part of the step
    return lambda: dt


TRAIN_PHASES = MODES
ORDER_SEED = 0  # the CPU timer's per-rep call order: random, but the same in every run


def time_impls(impls: dict, dy: torch.Tensor, reps: int, warmup: int, flush_l2: bool = False,
               phases=TRAIN_PHASES) -> dict:
    """name -> {"fwd": [ms...], "bwd": [...], "fwdbwd": [...]}, providers interleaved rep by rep
    (the CPU timer); dy [M, N] is the output gradient. phases: a subset of ``ALL_MODES``."""
    device = dy.device
    flush = None
    if flush_l2 and device.type == "cuda":
        flush = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device)

    def plan_for(impl):
        def reset():
            _reset_grads(impl)

        def fwd_then_keep():
            _reset_grads(impl)
            return impl.forward()

        def fwdbwd(_):
            y = impl.forward()
            impl.backward(y, dy)
            return y

        def infer(_):
            with torch.no_grad():
                return impl.infer()

        plan = {"fwd": (lambda _: impl.forward(), reset),
                "fwdbwd": (fwdbwd, reset),
                "bwd": (lambda y: impl.backward(y, dy), fwd_then_keep),
                "infer": (infer, reset)}
        return {ph: plan[ph] for ph in phases}

    plans = {name: plan_for(impl) for name, impl in impls.items()}
    pending = {name: {ph: [] for ph in phases} for name in impls}
    samples = [(name, ph) for name, plan in plans.items() for ph in plan]
    order = random.Random(ORDER_SEED)
    for i in range(warmup + reps):
        # A fresh order each rep: on a CPU a call's time depends on the call before it (cache and
        # allocator state: a 1024^2 fp32 GEMM measured 20.8 ms after one call, 19.5 ms in random
        # order), so a fixed order would bias some rows by a few percent.
        order.shuffle(samples)
        for name, ph in samples:
            fn, setup = plans[name][ph]
            got = _sample(fn, setup, device, flush)
            if i >= warmup:
                pending[name][ph].append(got)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return {name: {ph: [g() for g in lst] for ph, lst in d.items()} for name, d in pending.items()}


class _Rotation:
    """Cycles through copies of one provider ([(Impl, dy)], one per copy of the problem's tensors)
    and holds the last call's result.

    ``triton.testing.do_bench`` sets ``t.grad = None`` on every ``t`` of ``grad_to_none`` before each
    timed call; listed there, this object releases the previous result (and its autograd graph) at
    that point, outside the timed region, instead of inside the next call."""

    def __init__(self, pairs):
        self.pairs, self.i, self.last = list(pairs), 0, None

    def next(self):
        pair = self.pairs[self.i]
        self.i = (self.i + 1) % len(self.pairs)
        return pair

    def leaves(self) -> list:
        return [t for impl, _ in self.pairs for t in impl.leaves]

    @property
    def grad(self):
        return None

    @grad.setter
    def grad(self, value):
        self.last = None


def mode_callable(rot: _Rotation, mode: str, reset_grads: bool = False) -> Callable[[], None]:
    """A zero-argument call running ``mode`` ("fwd", "fwdbwd" or "infer") on the next copy of
    ``rot``. With ``reset_grads`` the call first sets the copy's leaf gradients to None (for timers
    without ``grad_to_none``)."""
    if mode not in ("fwd", "fwdbwd", "infer"):
        raise ValueError(f"mode must be fwd, fwdbwd or infer for a plain call (bwd needs an untimed "
                         f"forward per sample), got {mode!r}")

    def call():
        impl, dy = rot.next()
        if reset_grads:
            _reset_grads(impl)
        if mode == "fwd":
            rot.last = impl.forward()
        elif mode == "fwdbwd":
            impl.backward(impl.forward(), dy)
        else:
            with torch.no_grad():
                rot.last = impl.infer()
    return call


def prepare_call(family: "Family", case: "Case", provider: str, mode: str, device="cpu", dtype=None,
                 seed: int = 0) -> Callable[[], None]:
    """A zero-argument call running ``mode`` ("fwd", "fwdbwd" or "infer") of ``provider`` of
    ``family`` on ``case``, built and probed as a sweep does (one copy; leaf gradients reset at the
    start of each call; CUDA synchronised at the end): for external timers such as
    pytest-benchmark. Raises ValueError for a name the family does not have, RuntimeError when the
    provider fails its fwd+bwd probe."""
    device, dtype = resolve_device_dtype(device, dtype)
    if provider not in family.providers:
        raise ValueError(f"provider must be one of {family.providers}, got {provider!r}")
    problem = family.make_problem(case, device, dtype, seed)
    impl = family.build(problem, [provider])[provider]
    dy = random_factory(device, dtype, 10 ** 6)(case.M, case.N).to(device)
    err = probe(impl, dy)
    if err is not None:
        raise RuntimeError(f"{provider} failed at M,K,N,r={case.shape}: {err}")
    call = mode_callable(_Rotation([(impl, dy)]), mode, reset_grads=True)
    if device.type != "cuda":
        return call

    def synchronized():
        call()
        torch.cuda.synchronize(device)
    return synchronized


def _cuda_bwd_ms(rot: _Rotation, timing: Timing, flush: torch.Tensor) -> float:
    """Median ms of ``y.backward(dy)`` alone: per sample an untimed forward, an L2 clear, then the
    backward between CUDA events. Warm-up and sample count follow the ms budgets of ``timing``."""
    def sample():
        impl, dy = rot.next()
        _reset_grads(impl)
        y = impl.forward()
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        impl.backward(y, dy)
        end.record()
        return start, end

    sample()
    torch.cuda.synchronize(flush.device)
    # Budgets apply to whole samples (forward + L2 clear + backward), as do_bench's estimate
    # includes its cache clear: the sweep's duration stays bounded however short the backward is.
    t0 = time.perf_counter()
    for _ in range(5):
        sample()
    torch.cuda.synchronize(flush.device)
    per_sample = max((time.perf_counter() - t0) * 1e3 / 5, 1e-3)
    for _ in range(max(1, int(timing.warmup_ms / per_sample))):
        sample()
    events = [sample() for _ in range(min(timing.max_bwd_samples, max(1, int(timing.rep_ms / per_sample))))]
    torch.cuda.synchronize(flush.device)
    return statistics.median(s.elapsed_time(e) for s, e in events)


def measure(copies: list, dys: list, modes, timing: Timing, on_done: Optional[Callable] = None) -> dict:
    """{provider: {mode: median ms}}. ``copies`` is a list of {provider: Impl} dicts, one per copy
    of the problem's tensors (dys [M, N] alongside); CPU timing uses the first copy only.
    ``on_done(provider, {mode: ms})`` is called as each provider's timings are known."""
    if dys[0].device.type == "cuda":
        return _measure_cuda(copies, dys, modes, timing, on_done)
    med = {}
    times = time_impls(copies[0], dys[0], timing.reps, timing.warmup, phases=tuple(modes))
    for name, by_mode in times.items():
        med[name] = {m: statistics.median(v) for m, v in by_mode.items()}
        if on_done:
            on_done(name, med[name])
    return med


def _measure_cuda(copies: list, dys: list, modes, timing: Timing, on_done: Optional[Callable] = None) -> dict:
    """``measure`` on CUDA: do_bench for fwd, fwdbwd and infer, ``_cuda_bwd_ms`` for bwd, each
    provider rotating through its copies."""
    from triton.testing import do_bench

    device = dys[0].device
    with torch.cuda.device(device):  # events, do_bench and synchronize act on the current device
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        return _measure_cuda_on_current_device(copies, dys, modes, timing, on_done, do_bench, flush)


def _measure_cuda_on_current_device(copies, dys, modes, timing, on_done, do_bench, flush) -> dict:
    med = {}
    for name in copies[0]:
        rot = _Rotation((c[name], dy) for c, dy in zip(copies, dys))
        med[name] = {}
        for m in modes:
            if m == "bwd":
                med[name][m] = _cuda_bwd_ms(rot, timing, flush)
            else:
                med[name][m] = do_bench(mode_callable(rot, m), warmup=timing.warmup_ms, rep=timing.rep_ms,
                                        grad_to_none=rot.leaves() + [rot], return_mode="median")
            rot.last = None
        for impl, _ in rot.pairs:
            _reset_grads(impl)
        if on_done:
            on_done(name, med[name])
    return med


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None:
            seen[(t.device, t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
    return sum(seen.values())


def l2_cache_bytes(device) -> int:
    """L2 size of CUDA ``device`` in bytes (0 when unknown or not CUDA)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)


def rotation_copies(problem_bytes: int, device) -> int:
    """Copies of a problem to rotate through on CUDA: when one copy (``problem_bytes``) fits in L2,
    enough that the copies together exceed 2x L2 (capped at ROTATION_MAX_COPIES), else 1. CPU: 1."""
    l2 = l2_cache_bytes(device)
    if not l2 or problem_bytes <= 0 or problem_bytes >= l2:
        return 1
    return min(ROTATION_MAX_COPIES, math.ceil(2 * l2 / problem_bytes))


# ----------------------------------------------------------------------------- sweep

class Progress:
    """"[i/n] KxN M=.. r=.. provider ..." lines on stderr, one per (case, provider), when enabled;
    with the provider's times only when ``absolute`` (a GPU's: elsewhere times are shown as ratios,
    in the table, once the case's references are measured)."""

    def __init__(self, total: int, enabled: bool, absolute: bool = True):
        self.total, self.i, self.enabled, self.absolute = total, 0, enabled, absolute

    def line(self, case: Case, provider: str, text: str):
        self.i += 1
        if self.enabled:
            print(f"[{self.i}/{self.total}] {case.K}x{case.N} M={case.M} r={case.r} {provider} {text}",
                  file=sys.stderr, flush=True)


def _fmt_times(times: dict) -> str:
    return " ".join(f"{m} {v:.4g}" for m, v in times.items()) + " ms"


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((out.detach().double() - ref).norm() / ref.norm().clamp_min(1e-300))


def sweep(family: Family, cases, device, dtype, providers, modes, timing: Timing, verbose: bool = True) -> dict:
    """Times every provider of ``providers`` on every case; returns {"rows", "skipped" ({shape:
    {provider: error}}), "not_applicable" ({shape: {provider: reason}}), "copies" ({shape: n}),
    "shape_info" ({"K,N": ...})}. A provider that fails to build or to run one fwd+bwd is reported
    in "skipped" and left out of that case."""
    device = torch.device(device)
    plan = []
    not_applicable = {}
    for case in cases:
        names = []
        for n in providers:
            why = family.not_applicable(case, n, device, dtype) if family.not_applicable else None
            if why:
                not_applicable.setdefault(case.shape, {})[n] = why
            else:
                names.append(n)
        plan.append((case, names))
    total = sum(len(n) for _, n in plan)
    progress = Progress(total, verbose and total >= PROGRESS_MIN_ITEMS, absolute=device.type == "cuda")
    rows, skipped, copies_used, shape_info = [], {}, {}, {}
    last_kn = None
    for case, names in plan:
        if "peft_compiled" in names and (case.K, case.N) != last_kn:
            torch._dynamo.reset()  # compiled graphs of the previous (K, N) are not needed again
            last_kn = (case.K, case.N)
        problem = family.make_problem(case, device, dtype, 0)
        if family.shape_info and f"{case.K},{case.N}" not in shape_info:
            shape_info[f"{case.K},{case.N}"] = family.shape_info(problem)

        def skip(n, err):
            warnings.warn(f"{n} failed at M,K,N,r={case.shape}: {err}")
            skipped.setdefault(case.shape, {})[n] = err
            progress.line(case, n, f"skipped: {err}")

        dy = random_factory(device, dtype, 10 ** 6)(case.M, case.N).to(device)
        built = {}
        for n in names:
            try:
                built.update(family.build(problem, [n]))
            except Exception as e:  # a provider that cannot be built is reported, the others still run
                skip(n, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        # One untimed fwd+bwd per provider (compiles, autotunes, and catches failures).
        for n in list(built):
            err = probe(built[n], dy)
            if err is not None:
                skip(n, err)
                del built[n]
        errs, refs = {}, {}
        with torch.no_grad():
            for n, impl in built.items():
                # Guard: every row computes the function it claims (same weights, same adapters).
                key = n in family.no_lora
                if key not in refs:
                    refs[key] = family.expected(problem, n)
                errs[n] = _rel_err(impl.forward(), refs[key])
        del refs
        extras = {n: family.extras(impl, dy) for n, impl in built.items()} if family.extras else {}
        n_copies = rotation_copies(_storage_bytes(family.tensors(problem) + [dy]), device) if built else 1
        copies, dys = [built], [dy]
        for seed in range(1, n_copies):
            p_i = family.make_problem(case, device, dtype, seed)
            copies.append(family.build(p_i, list(built)))
            dys.append(random_factory(device, dtype, 10 ** 6 + seed)(case.M, case.N).to(device))
        copies_used[case.shape] = n_copies
        med = measure(copies, dys, modes, timing,
                      on_done=lambda n, t: progress.line(case, n, _fmt_times(t) if progress.absolute else "measured"))
        wbytes = {n: family.weight_bytes(problem, n) for n in built}
        for n in built:
            row = make_row(family, case, n, med, wbytes[n], modes)
            row["out_rel_err"] = errs[n]
            row.update(extras.get(n, {}))
            rows.append(row)
        del built, copies, dys, problem, dy
    return {"rows": rows, "skipped": skipped, "not_applicable": not_applicable, "copies": copies_used,
            "shape_info": shape_info}


def resolve_providers(family: Family, requested, quick: bool) -> list:
    """The family's providers to run: ``requested`` (any order, names of other families ignored) or
    the family's defaults (without ``quick_drop`` when quick), minus those whose libraries fail to import."""
    if requested is None:
        names = [p for p in family.providers if not (quick and p in family.quick_drop)]
    else:
        names = [p for p in requested if p in family.providers or p in family.optional]
    return family.available(names) if names else []


def run_family(family: Family, cases, device, dtype, providers, modes, timing: Timing, out, plot: bool = True,
               verbose: bool = True, ceilings: Optional[dict] = None) -> dict:
    """Sweeps ``family`` over ``cases`` and writes <family.stem>_<dtype>.{json,csv,png} under ``out``.
    Returns the result dict (metadata, ceilings, config, rows, skipped, not_applicable, ...)."""
    from lora_kernels.ops import select_backend

    device, dtype = resolve_device_dtype(device, dtype)
    modes = tuple(modes)
    swept = sweep(family, cases, device, dtype, providers, modes, timing, verbose)
    result = {
        "metadata": environment_metadata(device, dtype),
        "ceilings": ceilings if ceilings is not None else measure_ceilings(device, dtype),
        "config": {"family": family.name, "title": family.title, "impls": list(providers), "modes": list(modes),
                   "timing": timing.describe(device), "statistic": "median", "flops": FLOP_RULE,
                   "weight_GBps": WEIGHT_BYTES_RULE,
                   "ratios": f"time / reference time in the same case (< 1: faster); *_vs_base: {family.base}; "
                             "*_vs_peft: the like-for-like PEFT row (peft_ref); ratio_vs_*: the "
                             f"{main_mode(modes)} ratios",
                   "rotation_copies": swept["copies"], "l2_bytes": l2_cache_bytes(device) or None,
                   # (the dense family's calls run without dropout; NF4 calls never take the small-M route)
                   "lora_kernels_backend": {c.shape: select_backend(device, c.M, c.N, c.K, c.r,
                                                                    small_m_torch=family.name == "dense")
                                            for c in cases},
                   "scale": 2.0},
        "rows": swept["rows"],
        "skipped": swept["skipped"],
        "not_applicable": swept["not_applicable"],
    }
    if family.shape_info:
        result["formats"] = swept["shape_info"]
    if family.finalize:
        family.finalize(result)
    # a sweep with variant providers gets its own file: it must not replace the default table
    variants = "_variants" if any(p in family.optional for p in providers) else ""
    stem = f"{family.stem}{variants}_{result['metadata']['dtype']}"
    out = Path(out) if out is not None else default_out_dir(device)
    write_outputs(result, out, stem, csv_fields(modes, family.extra_fields), plot_speedups if plot else None)
    if verbose:
        print(format_table(result["rows"], result["metadata"], modes))
        if family.summary:
            print(family.summary(result))
        for shape, errs in result["skipped"].items():
            for n, err in errs.items():
                print(f"skipped {n} at {shape}: {err}")
        print(f"wrote {out}/{stem}.{{json,csv,png}}")
    return result


# ----------------------------------------------------------------------------- ceilings

def measure_ceilings(device: torch.device, dtype: torch.dtype, reps: int = 10) -> dict:
    """Device ceilings measured in the same run: copy bandwidth (GB/s, read + write bytes) of a
    large tensor and throughput (TFLOP/s) of a large square matmul in ``dtype``.

    CUDA: 1 GiB copy, 8192^3 matmul. CPU: 256 MiB copy, 2048^3 matmul.
    """
    cuda = device.type == "cuda"
    nbytes = (1 << 30) if cuda else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    n = 8192 if cuda else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def best_ms(fn):
        fn()
        times = []
        for _ in range(reps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    copy_ms = best_ms(lambda: dst.copy_(src))
    mm_ms = best_ms(lambda: torch.mm(a, b))
    return {"copy_bytes": nbytes, "copy_GBps": 2 * nbytes / copy_ms / 1e6,
            "matmul_n": n, "matmul_dtype": str(dtype).replace("torch.", ""),
            "matmul_TFLOPs": 2 * n ** 3 / mm_ms / 1e9}


# ----------------------------------------------------------------------------- driver

def parse_shapes(text: str) -> list:
    """"M,K,N,r;M,K,N,r" -> [(M, K, N, r), ...]."""
    shapes = []
    for part in text.split(";"):
        if part.strip():
            vals = tuple(int(v) for v in part.split(","))
            if len(vals) != 4:
                raise ValueError(f"shape {part!r} is not M,K,N,r")
            shapes.append(vals)
    return shapes


def resolve_device_dtype(device=None, dtype=None):
    """Defaults: CUDA + bf16 when a GPU is present, else CPU + fp32."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch device such as cpu, cuda or cuda:1, got {device!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device}: no CUDA GPU is available here (torch {torch.__version__})")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    return device, dtype


def check_names(arg: str, value, allowed) -> tuple:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v]
    value = tuple(value)
    bad = [v for v in value if v not in allowed]
    if bad or not value:
        raise ValueError(f"{arg} must be a non-empty list of {', '.join(allowed)}; got {list(value)}")
    return tuple(dict.fromkeys(value))


def run(shapes=None, device=None, dtype=None, reps=None, warmup=None, out=None, impls=None, *, providers=None,
        modes=MODES, families=FAMILIES, models=None, projs=None, ms=None, ranks=None, quick=False, rep_ms=None,
        warmup_ms=None, plot=True, verbose=True) -> dict:
    """Benchmarks each family in ``families`` ("dense" -> bench_<dtype>.*, "nf4" -> bench_qlora_<dtype>.*
    under ``out``) over the same cases: ``shapes`` [(M, K, N, r)], or the projections of ``models``
    ("8b", "70b") / ``projs`` (``PROJECTIONS``) x ``ms`` x ``ranks``, or the defaults of ``bench_grid``.
    ``providers`` (alias ``impls``): names from any family (default: each family's own); ``modes``:
    subset of ``ALL_MODES``. Returns {family: result dict}."""
    if impls is not None and providers is not None:
        raise ValueError("give providers or impls (its alias), not both")
    providers = providers if providers is not None else impls
    device, dtype = resolve_device_dtype(device, dtype)
    families = check_names("families", families, FAMILIES)
    modes = check_names("modes", modes, ALL_MODES)
    fams = [get_family(f) for f in families]
    if providers is not None:
        providers = check_names("providers", providers, [p for f in fams for p in f.providers + f.optional])
    cases = resolve_cases(device, bench_grid, shapes, models, projs, ms, ranks, quick)
    if all(v is None for v in (shapes, models, projs, ms, ranks)):
        cases += [c for c in default_extra_cases(device, quick) if c not in cases]
    timing = default_timing(quick, reps, warmup, rep_ms, warmup_ms)
    chosen = {f.name: resolve_providers(f, providers, quick) for f in fams}
    if not any(chosen.values()):
        raise ValueError(f"no provider to run for families {list(families)} (providers={providers})")
    ceilings = measure_ceilings(device, dtype)
    results = {}
    for fam in fams:
        if chosen[fam.name]:
            results[fam.name] = run_family(fam, cases, device, dtype, chosen[fam.name], modes, timing, out,
                                           plot=plot, verbose=verbose, ceilings=ceilings)
        elif verbose:
            print(f"{fam.name}: no provider to run (none requested, or their libraries do not import); "
                  "no table written")
    return results


def write_outputs(result: dict, out: Path, stem: str, csv_fields, plotter=None):
    """Writes <stem>.json (metadata + rows), <stem>.csv (``csv_fields``) and, if given, <stem>.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=csv_fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(result["rows"])
    if plotter is not None:
        try:
            import matplotlib
            matplotlib.use("Agg")  # headless: never needs a display
        except ImportError:
            warnings.warn("matplotlib unavailable; no plot written")
            return
        plotter(result, out / f"{stem}.png")


def fmt_num(v, spec):
    """format(v, spec), or a right-aligned "-" of the same width for None/NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return format("-", ">" + re.match(r"\d*", spec).group())
    return format(v, spec)


def format_table(rows, meta, modes=MODES) -> str:
    """Fixed-width text table of sweep rows: ms per mode, then TFLOP/s, GB/s and the ratios of the
    main mode (``main_mode``); saved / peak memory when the rows carry them. Without a GPU, each
    mode's time ÷ the base-only matmul's instead of ms, and no rates."""
    main = main_mode(modes)
    mem = any("saved_bytes" in r for r in rows)
    absolute = absolute_times(meta)
    head = (f"{meta['device']}  {meta['dtype']}  torch {meta['torch']}  triton {meta['triton']}  "
            f"peft {meta['peft']}  bitsandbytes {meta['bitsandbytes']}")
    if not absolute:
        head += "  (no GPU: times as ratios to the base-only matmul of the same run)"
    cols = f"{'shape M,K,N,r':<22}{'provider':<23}" + "".join(
        f"{m + (' ms' if absolute else ' x base'):>{11 if absolute else 15}}" for m in modes)
    cols += f"{main + ' TF/s':>13}{'GB/s':>8}{'x base':>8}{'x peft':>8}" if absolute else f"{'x peft':>8}"
    cols += f"{'saved MiB':>10}{'peak MiB':>9}" if mem else ""
    lines = [head, cols]
    for r in rows:
        line = f"{r['shape']:<22}{r['impl']:<23}"
        if absolute:
            line += "".join(fmt_num(r.get(f"{m}_ms"), "11.4f") for m in modes)
            line += (f"{fmt_num(r.get(f'{main}_TFLOPs'), '13.3f')}{fmt_num(r.get(f'{main}_GBps'), '8.1f')}"
                     f"{fmt_num(r.get(f'{main}_vs_base'), '8.3f')}{fmt_num(r.get(f'{main}_vs_peft'), '8.3f')}")
        else:
            line += "".join(fmt_num(r.get(f"{m}_vs_base"), "15.3f") for m in modes)
            line += fmt_num(r.get(f"{main}_vs_peft"), "8.3f")
        if mem:
            line += f"{fmt_num(mib(r.get('saved_bytes')), '10.2f')}{fmt_num(mib(r.get('peak_fwdbwd_bytes')), '9.1f')}"
        lines.append(line)
    return "\n".join(lines)


def plot_speedups(result, path):
    """Speed-up (reference time / time, main mode) against M, log-x: one subplot per (K, N), a block
    of subplots against the PEFT reference and a block against the base-only matmul."""
    import matplotlib.pyplot as plt

    rows = result["rows"]
    mode = main_mode(result["config"]["modes"])
    kns = list(dict.fromkeys((r["K"], r["N"]) for r in rows))
    if not kns:
        return
    ranks = sorted({r["r"] for r in rows})
    series = list(dict.fromkeys((r["impl"], r["r"]) for r in rows))
    colors = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")
    style = {s: dict(color=colors(i % colors.N), marker="os^Dv<>p"[(i // colors.N) % 8]) for i, s in enumerate(series)}
    ncols = min(4, len(kns))
    nr = -(-len(kns) // ncols)
    fig, axes = plt.subplots(2 * nr, ncols, figsize=(max(6.5, 4.0 * ncols), 2.9 * 2 * nr + 1.2), squeeze=False,
                             layout="constrained")
    blocks = (("vs_peft", "peft_ref", "speed-up vs PEFT"), ("vs_base", "base_ref", "speed-up vs base-only"))
    handles = {}
    for idx, (K, N) in enumerate(kns):
        rr, cc = divmod(idx, ncols)
        for b, (key, ref_key, ylabel) in enumerate(blocks):
            ax = axes[b * nr + rr][cc]
            for provider, rank in series:
                pts = [(r["M"], 1 / r[f"{mode}_{key}"]) for r in rows
                       if (r["K"], r["N"], r["impl"], r["r"]) == (K, N, provider, rank)
                       and r.get(f"{mode}_{key}") and r.get(ref_key) != provider]
                if pts:
                    label = provider + (f" r={rank}" if len(ranks) > 1 else "")
                    (line,) = ax.plot(*zip(*sorted(pts)), ms=3, label=label, **style[(provider, rank)])
                    handles.setdefault(label, line)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("M (tokens)", fontsize=8)
            ax.set_ylabel(f"{mode} {ylabel}", fontsize=8)
            ax.tick_params(labelsize=7)
            label = shape_label(K, N)
            ax.set_title(f"{label + ': ' if label else ''}K={K}, N={N}", fontsize=8)
    for idx in range(len(kns), nr * ncols):
        rr, cc = divmod(idx, ncols)
        for b in range(2):
            axes[b * nr + rr][cc].set_visible(False)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(4, len(handles)),
                   fontsize=7)
    meta = result["metadata"]
    title = result["config"].get("title", "")
    fig.suptitle(f"{title} {mode} speed-up (> 1: faster than the reference), {meta['device']}, {meta['dtype']}",
                 fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI

def _list_arg(convert=str, allowed=None):
    def parse(text):
        try:
            values = [convert(v) for v in text.split(",") if v.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}")
        if not values:
            raise argparse.ArgumentTypeError("empty list")
        bad = [v for v in values if allowed is not None and v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not among {', '.join(allowed)}")
        if convert is int and any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: values must be positive")
        return values
    return parse


def _shapes_arg(text):
    try:
        return parse_shapes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def add_common_arguments(parser: argparse.ArgumentParser, impls=ALL_IMPLS):
    """--device, --dtype, --shapes, --out, --providers (alias --impls; dest ``impls``)."""
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if present)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--shapes", type=_shapes_arg, default=None, help='explicit "M,K,N,r;M,K,N,r"')
    parser.add_argument("--out", type=Path, default=None,
                        help="output dir (default benchmarks/results/<device-kind>/)")
    parser.add_argument("--providers", "--impls", dest="impls", type=_list_arg(), default=list(impls), metavar="LIST",
                        help=f"comma-separated subset of {','.join(impls)}")


def add_sweep_arguments(parser: argparse.ArgumentParser, providers, default_modes):
    """The sweep options shared by ``bench`` and ``qlora`` (see ``add_arguments``)."""
    add_common_arguments(parser, impls=providers)
    parser.set_defaults(impls=None)  # None: each family's defaults (--quick leaves peft_compiled out)
    parser.add_argument("--model", choices=("8b", "70b", "all"), default=None,
                        help="Llama-3 projection shapes (default: 8b+70b on GPU, small shapes on CPU)")
    parser.add_argument("--proj", type=_list_arg(allowed=PROJECTIONS), default=None,
                        help=f"projections, comma-separated from {','.join(PROJECTIONS)} (default all)")
    parser.add_argument("--m", type=_list_arg(int), default=None, help="M values (tokens), e.g. 16,256,4096")
    parser.add_argument("--rank", type=_list_arg(int), default=None, help=f"LoRA ranks, e.g. 16,64 (default {RANK})")
    parser.add_argument("--modes", type=_list_arg(allowed=ALL_MODES), default=list(default_modes),
                        help=f"comma-separated from {','.join(ALL_MODES)} (default {','.join(default_modes)})")
    parser.add_argument("--quick", action="store_true", help="smaller sweep and shorter timing (module docstring)")
    parser.add_argument("--reps", type=int, default=None, help="CPU: timed samples (default 10, quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="CPU: untimed samples (default 2, quick 1)")
    parser.add_argument("--rep-ms", type=float, default=None, help="CUDA: do_bench rep budget (default 30, quick 20)")
    parser.add_argument("--warmup-ms", type=float, default=None, help="CUDA: do_bench warm-up (default 10, quick 5)")
    parser.add_argument("--no-plot", action="store_true", help="write JSON and CSV only")


def add_arguments(parser: argparse.ArgumentParser):
    """Bench CLI options."""
    from lora_kernels.tools.qlora_bench import QLORA_IMPLS

    add_sweep_arguments(parser, DENSE_PROVIDERS + QLORA_IMPLS, MODES)
    parser.add_argument("--family", type=_list_arg(allowed=FAMILIES), default=list(FAMILIES),
                        help="dense (bench_<dtype>.*), nf4 (bench_qlora_<dtype>.*) or both (default)")


def _models_arg(model):
    return None if model is None else (tuple(LLAMA3) if model == "all" else (model,))


def sweep_kwargs(args) -> dict:
    """run() keyword arguments from parsed ``add_sweep_arguments`` options."""
    return dict(shapes=args.shapes, device=args.device, dtype=args.dtype, reps=args.reps, warmup=args.warmup,
                out=args.out, providers=args.impls, modes=args.modes, models=_models_arg(args.model),
                projs=args.proj, ms=args.m, ranks=args.rank, quick=args.quick, rep_ms=args.rep_ms,
                warmup_ms=args.warmup_ms, plot=not args.no_plot)


def run_from_args(args) -> dict:
    return run(families=args.family, **sweep_kwargs(args))


def standalone_main(doc: str, add_args: Callable, run_args: Callable, argv=None):
    """``python -m lora_kernels.tools.<tool>``: a parser titled by the tool's docstring, its options, its run."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_args(parser)
    return run_args(parser.parse_args(argv))


def mib(value) -> Optional[float]:
    """Bytes as MiB (None stays None)."""
    return None if value is None else value / 2 ** 20


def main(argv=None) -> dict:
    return standalone_main(__doc__, add_arguments, run_from_args, argv)


if __name__ == "__main__":
    main()
