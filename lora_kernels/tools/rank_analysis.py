"""Rank analysis of trained LoRA adapters (Hu et al. 2021, section 7), without forming ΔW.

For ΔW = s·B·A (B [N, r], A [r, K]) the thin QR factorisations B = Q_B R_B and Aᵀ = Q_A R_A give
ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ, so the SVD of the r×r core yields ΔW's singular values and its top
singular vectors U = Q_B U_c [N, r], V = Q_A V_c [K, r] in O((N + K) r²) time and memory: the N×K
matrix is never formed. Everything is computed in float64.

    delta_svd(lora_A, lora_B, scale)              -> DeltaSVD(U [N, r], S [r], V [K, r])
    subspace_similarity(svd1, svd2, i, j)         -> ‖U₁[:, :i]ᵀ U₂[:, :j]‖²_F / min(i, j)   (in [0, 1])
    base_projection(weight, svd, k)               -> ‖U_kᵀ W₀ V_k‖_F, ‖ΔW‖_F and their ratio
    load_peft_adapter(dir)                        -> {layer: (lora_A, lora_B, scale)}

``subspace_similarity`` is the paper's φ (the normalised overlap of the spans of the top-i singular
vectors of one adapter and the top-j of another; 1 when one span contains the other, about
max(i, j)/n for random subspaces of R^n); ``side`` picks the output (left, U) or input (right, V)
singular vectors. ``base_projection`` is the paper's ‖UᵀW₀Vᵀ‖_F check of how much ΔW amplifies
directions of W₀; NF4 base weights are decoded a block of rows at a time.

CLI: ``python -m lora_kernels analyze ADAPTER_DIR [--compare OTHER_DIR] [--base WEIGHTS] [--out DIR]``.
"""
import argparse
import json
import math
import numbers
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from lora_kernels.ops.nf4 import NF4Tensors, NF4Weight
from lora_kernels.ops.reference import nf4_decode_range


@dataclass
class DeltaSVD:
    """Thin SVD of ΔW = s·B·A [N, K]: ΔW = U diag(S) Vᵀ, S descending (float64)."""
    U: Tensor  # [N, q], q = min(r, N, K)
    S: Tensor  # [q]
    V: Tensor  # [K, q]

    @property
    def frobenius(self) -> float:
        """‖ΔW‖_F."""
        return float(self.S.norm())

    @property
    def rank(self) -> int:
        """The numerical rank of ΔW: singular values above S[0]·max(N, K)·eps (numpy's matrix_rank
        rule). Singular vectors beyond it span no part of ΔW: any orthonormal completion is as good,
        so subspace similarities and projections use the first ``rank`` only."""
        if not self.S.numel():
            return 0
        tol = float(self.S[0]) * max(self.U.shape[0], self.V.shape[0]) * torch.finfo(torch.float64).eps
        return int((self.S > tol).sum())

    def effective_rank(self, energy: float = 0.9) -> int:
        """Smallest k with sum(S[:k]²) ≥ energy · sum(S²) (0 for ΔW = 0)."""
        if isinstance(energy, bool) or not isinstance(energy, numbers.Real):
            raise TypeError(f"energy must be a real number in (0, 1], got {type(energy).__name__}")
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        power = self.S.square()
        total = float(power.sum())
        if total == 0.0:
            return 0
        cumulative = torch.cumsum(power, 0) / total
        return int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=cumulative.dtype)).item()) + 1


def _check_matrix(name: str, value, empty_dim: Optional[int] = None, finite: bool = True) -> Tensor:
    """value as a 2-D floating-point tensor with no empty dimension but ``empty_dim`` (the rank), and
    (``finite``) no NaN or infinite entry."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 2 or not value.is_floating_point():
        raise ValueError(f"{name} must be a 2-D floating-point tensor, got shape {tuple(value.shape)} {value.dtype}")
    if any(size == 0 and dim != empty_dim for dim, size in enumerate(value.shape)):
        raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")
    if finite and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite, got NaN or infinite entries")
    return value


def delta_svd(lora_A: Tensor, lora_B: Tensor, scale: float = 1.0) -> DeltaSVD:
    """SVD of ΔW = scale · lora_B @ lora_A through thin QR of lora_B [N, r] and lora_Aᵀ [K, r].
    r = 0 (an AdaLoRA layer its budget pruned whole) gives ΔW = 0: no singular values."""
    A = _check_matrix("lora_A", lora_A, empty_dim=0).detach().double().cpu()
    B = _check_matrix("lora_B", lora_B, empty_dim=1).detach().double().cpu()
    if A.shape[0] != B.shape[1]:
        raise ValueError(f"lora_A [r, K] and lora_B [N, r] must share r, got lora_A {tuple(A.shape)} and "
                         f"lora_B {tuple(B.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if not A.shape[0]:
        empty = torch.zeros(0, dtype=torch.float64)
        return DeltaSVD(U=B.new_zeros(B.shape[0], 0), S=empty, V=A.new_zeros(A.shape[1], 0))
    Qb, Rb = torch.linalg.qr(B)        # [N, qb], [qb, r]
    Qa, Ra = torch.linalg.qr(A.t())    # [K, qa], [qa, r]
    Uc, S, Vch = torch.linalg.svd(float(scale) * (Rb @ Ra.t()), full_matrices=False)  # [qb, qa] core
    q = min(S.numel(), A.shape[0])
    return DeltaSVD(U=Qb @ Uc[:, :q], S=S[:q], V=Qa @ Vch[:q].t())


def _check_svd(name: str, value) -> DeltaSVD:
    if not isinstance(value, DeltaSVD):
        raise TypeError(f"{name} must be a DeltaSVD (from delta_svd), got {type(value).__name__}")
    return value


def _basis(svd: DeltaSVD, side: str) -> Tensor:
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' (output space, U) or 'right' (input space, V), got {side!r}")
    return svd.U if side == "left" else svd.V


def _defined_bases(svd1, svd2, side: str) -> tuple:
    """The singular vectors (side) of both adapters within their numerical ranks (``DeltaSVD.rank``)."""
    svd1, svd2 = _check_svd("svd1", svd1), _check_svd("svd2", svd2)
    X1, X2 = _basis(svd1, side), _basis(svd2, side)
    if X1.shape[0] != X2.shape[0]:
        raise ValueError(f"the adapters act on different spaces: {side} singular vectors of length {X1.shape[0]} "
                         f"and {X2.shape[0]}")
    return X1[:, :svd1.rank], X2[:, :svd2.rank]


def _check_rank_index(name: str, value, limit: int) -> int:
    """value as an int in [1, limit], limit a ΔW's numerical rank (TypeError / ValueError naming it)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 1 <= value <= limit:
        raise ValueError(f"{name} must be an int in [1, {limit}] (the numerical rank of the adapter's ΔW: "
                         f"singular vectors beyond it are arbitrary), got {value!r}")
    return int(value)


def subspace_similarity(svd1: DeltaSVD, svd2: DeltaSVD, i: int, j: int, side: str = "left") -> float:
    """‖X₁[:, :i]ᵀ X₂[:, :j]‖²_F / min(i, j) with X = U (side="left") or V (side="right"); in [0, 1].
    i, j: from 1 to each ΔW's numerical rank (``DeltaSVD.rank``; none for ΔW = 0)."""
    X1, X2 = _defined_bases(svd1, svd2, side)
    i, j = (_check_rank_index(name, value, limit) for name, value, limit in (("i", i, X1.shape[1]),
                                                                             ("j", j, X2.shape[1])))
    overlap = X1[:, :i].t() @ X2[:, :j]
    return float(overlap.square().sum()) / min(i, j)


def similarity_grid(svd1: DeltaSVD, svd2: DeltaSVD, side: str = "left") -> Tensor:
    """[rank1, rank2] float64 grid of subspace_similarity(svd1, svd2, i, j) for i, j from 1 (one matmul);
    rank: each ΔW's numerical rank (an empty grid if one ΔW is 0)."""
    X1, X2 = _defined_bases(svd1, svd2, side)
    # cumulative sums over both ranks of the squared overlaps give every ‖X1_iᵀ X2_j‖²_F at once
    power = (X1.t() @ X2).square().cumsum(0).cumsum(1)
    i = torch.arange(1, power.shape[0] + 1, dtype=power.dtype)[:, None]
    j = torch.arange(1, power.shape[1] + 1, dtype=power.dtype)[None, :]
    return power / torch.minimum(i, j)


def _row_chunks(weight: Union[Tensor, NF4Weight], rows_per_chunk: int):
    """Yields float64 CPU blocks of rows of W₀ [N, K]; an NF4 weight is decoded one block at a time
    (bit-exact with bitsandbytes' dequantize_4bit), never whole."""
    N, K = weight.shape
    if isinstance(weight, NF4Weight):
        wq = NF4Tensors.of(weight)
        for r0 in range(0, N, rows_per_chunk):
            r1 = min(N, r0 + rows_per_chunk)
            yield nf4_decode_range(wq, r0 * K, r1 * K).reshape(r1 - r0, K).double().cpu()
    else:
        for r0 in range(0, N, rows_per_chunk):
            yield weight[r0:r0 + rows_per_chunk].detach().double().cpu()


# Default block of W₀ rows for base_projection: ~1M elements (8 MiB in float64), whatever K is, so that
# a row block is a small fraction of any LLM projection (4096 x 4096 included) decoded whole.
CHUNK_ELEMENTS = 1 << 20


def base_projection(weight: Union[Tensor, NF4Weight], svd: DeltaSVD, k: Optional[int] = None,
                    rows_per_chunk: Optional[int] = None) -> dict:
    """How much ΔW's top-k directions are already in W₀ (the LoRA paper's table 7 quantities).

    Returns {"k", "projection": ‖U_kᵀ W₀ V_k‖_F, "delta_frobenius": ‖ΔW_k‖_F (top k singular values),
    "weight_frobenius": ‖W₀‖_F, "amplification": ‖ΔW_k‖_F / ‖U_kᵀ W₀ V_k‖_F}.
    weight: [N, K] tensor or NF4Weight (never decoded whole: rows_per_chunk rows at a time, by
        default as many as fit in CHUNK_ELEMENTS, at least one).
    """
    svd = _check_svd("svd", svd)
    q = svd.rank  # directions beyond ΔW's numerical rank are arbitrary
    k = q if k is None else _check_rank_index("k", k, q)
    if rows_per_chunk is not None and (isinstance(rows_per_chunk, bool) or not isinstance(rows_per_chunk, int)
                                       or rows_per_chunk < 1):
        raise ValueError(f"rows_per_chunk must be None or a positive int, got {rows_per_chunk!r}")
    if isinstance(weight, Tensor):
        _check_matrix("weight", weight, finite=False)  # checked a block of rows at a time below
    elif not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be a torch.Tensor or an NF4Weight, got {type(weight).__name__}")
    if tuple(weight.shape) != (svd.U.shape[0], svd.V.shape[0]):
        raise ValueError(f"weight must be [N, K] = [{svd.U.shape[0]}, {svd.V.shape[0]}] like the adapter's ΔW, "
                         f"got {tuple(weight.shape)}")
    if rows_per_chunk is None:
        rows_per_chunk = max(1, CHUNK_ELEMENTS // weight.shape[1])
    U, V = svd.U[:, :k], svd.V[:, :k]
    projected = torch.zeros(k, k, dtype=torch.float64)
    weight_power, r0 = 0.0, 0
    for rows in _row_chunks(weight, rows_per_chunk):  # Uᵀ W₀ V = Σ over row blocks of U[rows]ᵀ (W₀[rows] V)
        if not bool(torch.isfinite(rows).all()):
            raise ValueError(f"weight must be finite, got NaN or infinite entries in rows {r0}..{r0 + rows.shape[0] - 1}")
        projected += U[r0:r0 + rows.shape[0]].t() @ (rows @ V)
        weight_power += float(rows.square().sum())
        r0 += rows.shape[0]
    projection = float(projected.norm())
    delta = float(svd.S[:k].norm())
    return {"k": k, "projection": projection, "delta_frobenius": delta, "weight_frobenius": math.sqrt(weight_power),
            "amplification": delta / projection if projection > 0 else math.inf}


# --------------------------------------------------------------------------------------------- PEFT adapter files

def _pattern_value(patterns: dict, layer: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the layer name."""
    for pattern, value in (patterns or {}).items():
        try:
            matched = re.match(rf"(.*\.)?({pattern})$", layer)
        except re.error as exc:
            raise ValueError(f"pattern {pattern!r} of the adapter config is not a valid regular expression: {exc}") from exc
        if matched:
            return value
    return default


def _read_tensors(path: Path) -> dict:
    """The tensors of a .safetensors file or a torch.save'd state dict (ValueError naming the file if
    it is neither)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        tensors = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors' and pickle's own errors: a file that is not what it says
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # (torch.load's run on)
        raise ValueError(f"{path} is not a readable {path.suffix or 'weights'} file: {first_line}") from exc
    if not isinstance(tensors, dict):
        raise ValueError(f"{path} holds a {type(tensors).__name__}, not a state dict of tensors")
    return tensors


def adapter_config(adapter_dir: Union[str, Path], name: str = "adapter_dir") -> dict:
    """The adapter_config.json of a PEFT adapter folder, as a dict (``name``: the argument, for errors)."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        raise ValueError(f"{name} must be a PEFT adapter folder with adapter_config.json, got {adapter_dir}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object (PEFT's config), got a {type(config).__name__}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise ValueError(f"{config_path}: {key} must be an object {{pattern: value}}, got {config[key]!r}")
    return config


def load_peft_adapter(adapter_dir: Union[str, Path], name: str = "adapter_dir") -> dict:
    """{layer name: (lora_A [r, K], lora_B [N, r], scale)} from a PEFT adapter folder
    (adapter_config.json + adapter_model.safetensors or .bin), float32 on CPU.

    scale follows the config: lora_alpha / r, lora_alpha / sqrt(r) with use_rslora, rank_pattern and
    alpha_pattern per layer; AdaLoRA adapters fold lora_E into A (ΔW = B (A ⊙ E) α / r).
    """
    adapter_dir = Path(adapter_dir)
    config = adapter_config(adapter_dir, name)
    weights = next((adapter_dir / f for f in ("adapter_model.safetensors", "adapter_model.bin")
                    if (adapter_dir / f).is_file()), None)
    if weights is None:
        raise ValueError(f"{name} {adapter_dir} has no adapter_model.safetensors or adapter_model.bin")
    tensors = _read_tensors(weights)
    adalora = config.get("peft_type") == "ADALORA"
    layers = {}
    for key in sorted(tensors):
        m = re.fullmatch(r"(.+)\.lora_A(?:\.[^.]+)?\.weight", key) or re.fullmatch(r"(.+)\.lora_A(?:\.[^.]+)?", key)
        if not m:
            continue
        name = m.group(1)
        b_key = key.replace(".lora_A", ".lora_B", 1)
        if b_key not in tensors:
            raise ValueError(f"{weights}: {key} has no matching {b_key}")
        A, B = tensors[key].float(), tensors[b_key].float()
        if A.dim() != 2 or B.dim() != 2:
            continue  # conv adapters: not a linear ΔW
        r = A.shape[0]  # the file's rank: rank_pattern's value for this layer, or r
        # PEFT matches the patterns against the module name inside the model, without the PeftModel's
        # "base_model.model." (an anchored pattern, "^model.layers.0...", would not match the key)
        module_name = name.removeprefix("base_model.model.")
        alpha = _pattern_value(config.get("alpha_pattern"), module_name, config.get("lora_alpha", r))
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"{adapter_dir}: lora_alpha (or its alpha_pattern entry) of {module_name} must be a "
                             f"finite number, got {alpha!r}")
        if not adalora and r == 0:
            raise ValueError(f"{weights}: {key} has rank 0 (a LoRA adapter's rank is >= 1)")
        if adalora:
            e_key = key.replace(".lora_A", ".lora_E", 1)
            if e_key in tensors:
                A = A * tensors[e_key].float()
            init_r = config.get("init_r", r)
            scale = (alpha if alpha > 0 else float(init_r)) / (init_r + 1e-5)
        else:
            scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        layers[name] = (A, B, float(scale))
    if not layers:
        raise ValueError(f"{weights} holds no linear LoRA adapters (no *.lora_A.weight keys)")
    return layers


def _load_base_weight(base: dict, layer: str, fan_in_fan_out: bool = False):
    """The base weight [N, K] of ``layer`` from a state dict (dense, or bitsandbytes NF4 keys), else None.
    fan_in_fan_out (the adapter config's): the dense weights are stored [K, N], as transformers' Conv1D
    (GPT-2) keeps them, and come back transposed (bitsandbytes stores its NF4 weights [N, K] always)."""
    for prefix in (layer, layer.removeprefix("base_model.model.")):
        for key in (f"{prefix}.weight", f"{prefix}.base_layer.weight"):
            if f"{key}.quant_state.bitsandbytes__nf4" in base:
                return NF4Weight.from_state_dict(base, prefix=key)
            if key in base and base[key].is_floating_point():
                return base[key].t() if fan_in_fan_out else base[key]
    return None


def _load_base(path: Union[str, Path]) -> dict:
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ValueError(f"base must be a .safetensors/.bin file or a folder holding them, got {path}")
    merged = {}
    for f in files:
        merged.update(_read_tensors(f))
    return merged


def analyze_adapter(adapter_dir, compare_dir=None, base=None, energy: float = 0.9, top: int = 8) -> dict:
    """Per layer of a PEFT adapter: singular values of ΔW, effective rank (``energy`` of ‖ΔW‖²_F),
    ‖ΔW‖_F; with ``compare_dir`` the subspace similarity to the same layer of another adapter
    (κ at i = j = 1 and at i = j = min rank, left singular vectors, plus the mean of the grid);
    with ``base`` (state dict file/folder of the base model) the projection of W₀ onto ΔW's top-``top``
    directions (W₀ [N, K] as ΔW: a fan_in_fan_out adapter's dense base weights, stored [K, N] by
    transformers' Conv1D, are transposed)."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive int (directions for the base projection), got {top!r}")
    layers = load_peft_adapter(adapter_dir)
    fan_in_fan_out = bool(adapter_config(adapter_dir).get("fan_in_fan_out"))
    other = load_peft_adapter(compare_dir, "compare_dir") if compare_dir is not None else None
    base_sd = _load_base(base) if base is not None else None
    rows, notes = [], []
    for name, (A, B, scale) in layers.items():
        svd = delta_svd(A, B, scale)
        row = {"layer": name, "N": B.shape[0], "K": A.shape[1], "r": A.shape[0], "scale": scale,
               "singular_values": [float(v) for v in svd.S], "effective_rank": svd.effective_rank(energy),
               "delta_frobenius": svd.frobenius}
        if other is not None and name not in other:
            notes.append(f"{name}: not in the compared adapter")
        elif other is not None:
            svd2 = delta_svd(*other[name])
            if svd2.U.shape[0] != svd.U.shape[0]:
                notes.append(f"{name}: the compared adapter's ΔW has {svd2.U.shape[0]} rows, this one {svd.U.shape[0]}")
            elif svd.rank and svd2.rank:  # (ΔW = 0: no subspace)
                q = min(svd.rank, svd2.rank)
                grid = similarity_grid(svd, svd2)
                row.update(similarity_top1=float(grid[0, 0]), similarity_full=float(grid[q - 1, q - 1]),
                           similarity_grid_mean=float(grid.mean()))
        if base_sd is not None and svd.rank:
            weight = _load_base_weight(base_sd, name, fan_in_fan_out)
            if weight is None:
                notes.append(f"{name}: no base weight for it in {base}")
            else:
                row.update({f"base_{k}": v for k, v in base_projection(weight, svd, min(top, svd.rank)).items()})
        if not svd.rank:
            notes.append(f"{name}: ΔW = 0 (no singular directions to compare or project)")
        rows.append(row)
    return {"adapter": str(adapter_dir), "compare": str(compare_dir) if compare_dir else None,
            "base": str(base) if base else None, "energy": energy, "rows": rows, "notes": notes}


def format_table(result: dict) -> str:
    rows = result["rows"]
    width = max([len(r["layer"]) for r in rows] + [5])
    head = f"{'layer':<{width}} {'N×K':>12} {'r':>4} {'σ1':>10} {'σ_r':>10} {'eff.r':>5} {'‖ΔW‖F':>10}"
    extra = [k for k in ("similarity_top1", "similarity_full", "base_amplification") if any(k in r for r in rows)]
    head += "".join(f" {k.replace('similarity_', 'κ_').replace('base_', ''):>13}" for k in extra)
    lines = [head]
    for r in rows:
        s = r["singular_values"] or [0.0]  # (r = 0: ΔW = 0)
        line = (f"{r['layer']:<{width}} {str(r['N']) + '×' + str(r['K']):>12} {r['r']:>4} {s[0]:>10.4g} "
                f"{s[-1]:>10.4g} {r['effective_rank']:>5} {r['delta_frobenius']:>10.4g}")
        line += "".join(f" {r[k]:>13.4g}" if k in r else f" {'-':>13}" for k in extra)
        lines.append(line)
    return "\n".join(lines)


def _plot_spectra(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    kinds = sorted({r["layer"].rsplit(".", 1)[-1] for r in result["rows"]})
    colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
    for r in result["rows"]:
        s = torch.tensor(r["singular_values"])
        if s.numel() and s[0] > 0:
            kind = r["layer"].rsplit(".", 1)[-1]
            ax.plot(range(1, s.numel() + 1), (s / s[0]).tolist(), color=colors[kind], lw=0.8, alpha=0.6)
    for kind, c in colors.items():
        ax.plot([], [], color=c, label=kind)
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("σ_i / σ_1 of ΔW = s·B·A")
    ax.set_title(f"LoRA ΔW spectra: {Path(result['adapter']).name}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter_dir", help="PEFT adapter folder (adapter_config.json + adapter_model.*)")
    parser.add_argument("--compare", default=None, help="a second adapter folder: subspace similarity per layer")
    parser.add_argument("--base", default=None,
                        help="base model weights (.safetensors/.bin file or folder; NF4 bitsandbytes keys accepted): "
                             "projection of W0 onto each ΔW's top directions")
    parser.add_argument("--top", type=int, default=8, help="directions used for the base projection (default 8)")
    parser.add_argument("--energy", type=float, default=0.9, help="energy fraction for the effective rank")
    parser.add_argument("--out", type=Path, default=None, help="write analysis.json and spectra.png here")


def run_from_args(args) -> dict:
    result = analyze_adapter(args.adapter_dir, args.compare, args.base, energy=args.energy, top=args.top)
    print(format_table(result))
    for note in result["notes"]:  # what the table leaves blank, and why
        print(f"note: {note}", file=sys.stderr)
    if args.out is not None:
        from lora_kernels.tools.bench import environment_metadata
        args.out.mkdir(parents=True, exist_ok=True)
        result = dict(result, metadata=environment_metadata())
        (args.out / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
        try:
            _plot_spectra(result, args.out / "spectra.png")
        except ImportError:
            pass
        print(f"wrote {args.out}/analysis.json, spectra.png")
    return result
