"""The tile-config table is well formed for every (kernel, padded rank, dot kind, arch), and the
AOT checker parses cuobjdump output and compiles a kernel for sm_90 without a GPU."""
import importlib
import inspect
import json
import os
import re
import subprocess
import sys

import pytest

from lora_kernels.kernels import configs
from lora_kernels.tools import aot_check

ALL_CONFIGS = [(name, R, kind, arch) for name in configs.KERNEL_CONFIGS for R in configs.PADDED_RANKS
               for kind in configs.DOT_KINDS for arch in configs.ARCHS]
# Block constexprs that are a dimension of some tl.dot operand (must be >= 16). GROUP_M is not.
DOT_DIMS = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "R_CHUNK"}


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _kernel_args(name):
    module_name, _ = configs.KERNEL_CONFIGS[name]
    fn = getattr(importlib.import_module(module_name), name)
    return list(inspect.signature(fn.fn).parameters)


@pytest.mark.parametrize("r, expected", [(1, 16), (2, 16), (15, 16), (16, 16), (17, 32), (32, 32),
                                         (33, 64), (64, 64), (65, 128), (100, 128), (128, 128),
                                         (129, 256), (200, 256), (255, 256), (256, 256)])
def test_padded_rank_values(r, expected):
    assert configs.padded_rank(r) == expected


def test_padded_rank_is_smallest_power_of_two_at_least_16():
    for r in range(1, configs.MAX_RANK + 1):
        R = configs.padded_rank(r)
        assert _is_pow2(R) and R >= max(r, 16) and (R == 16 or R // 2 < r)
        assert R in configs.PADDED_RANKS


def test_dot_kind_and_arch_family():
    assert configs.dot_kind(True, True, "ieee") == "ieee"
    assert configs.dot_kind(True, True, "tf32") == "tf32"
    assert configs.dot_kind(False, False, "ieee") == "half"
    assert configs.dot_kind(False, True, "ieee") == "half_lora32"
    assert [configs.arch_family(c) for c in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0))] == \
        [80, 80, 80, 90, 90, 90]


@pytest.mark.parametrize("name", list(configs.KERNEL_CONFIGS))
def test_config_keys_are_the_kernel_block_constexprs(name):
    args = _kernel_args(name)
    block_args = {a for a in args if a.startswith("BLOCK_") or a in ("GROUP_M", "R_CHUNK")}
    _, fn = configs.KERNEL_CONFIGS[name]
    for R in configs.PADDED_RANKS:
        for kind in configs.DOT_KINDS:
            for arch in configs.ARCHS:
                assert set(fn(R, kind, arch).blocks) == block_args, (name, R, kind, arch)


@pytest.mark.parametrize("name, R, kind, arch", ALL_CONFIGS)
def test_config_blocks_are_valid(name, R, kind, arch):
    _, fn = configs.KERNEL_CONFIGS[name]
    cfg = fn(R, kind, arch)
    assert isinstance(cfg, configs.TileConfig)
    for key, value in cfg.blocks.items():
        assert isinstance(value, int) and _is_pow2(value), (key, value)
        if key in DOT_DIMS:
            assert value >= 16, (key, value)  # tl.dot needs every dimension >= 16
    if "R_CHUNK" in cfg.blocks:
        assert cfg.blocks["R_CHUNK"] <= R and R % cfg.blocks["R_CHUNK"] == 0
    assert _is_pow2(cfg.num_warps) and cfg.num_warps <= 16
    assert 1 <= cfg.num_stages <= 5
    # the launchers share one cached instance per arguments: nobody may change it for the others
    assert fn(R, kind, arch) is cfg
    with pytest.raises(TypeError):
        cfg.blocks["BLOCK_M" if "BLOCK_M" in cfg.blocks else next(iter(cfg.blocks))] = 16


def test_aot_variants_cover_every_kernel_and_rank():
    rows = list(aot_check.variants())
    formats = sum(len(aot_check.aot_weight_formats(name)) * (2 if name in configs.SMALL_M_KERNELS else 1)
                  for name in configs.KERNEL_CONFIGS)
    decode = [r for r in rows if r[0] in aot_check.DECODE_KERNELS]
    assert len(rows) - len(decode) == formats * len(configs.PADDED_RANKS) * len(aot_check.DTYPE_PAIRS)
    assert {r[0] for r in rows} == set(configs.KERNEL_CONFIGS) | set(aot_check.DECODE_KERNELS)
    assert {r[1] for r in rows if r[0] not in aot_check.DECODE_KERNELS} == set(configs.PADDED_RANKS)
    for name in aot_check.DECODE_KERNELS:  # each decode kernel once per stored dtype
        assert sorted(r[2] for r in decode if r[0] == name) == ["bf16", "fp16", "fp32"]
    # every kernel that reads W is compiled for NF4 weights too
    assert {r[0] for r in rows if r[5] == "nf4"} == set(configs.WEIGHT_FORMATS) | set(aot_check.DECODE_KERNELS)
    # ... aligned (the tile decode) and not (the per-element decode, its own tiles)
    assert {r[0] for r in rows if r[5] == "nf4-unaligned"} == set(configs.WEIGHT_FORMATS)
    # ... and a dense W transposed (a Conv1D's [in, out] weight): unit stride along N, not K
    assert {r[0] for r in rows if r[5] == aot_check.TRANSPOSED_W} == set(configs.TRANSPOSED_WEIGHT_KERNELS)
    assert set(configs.TRANSPOSED_WEIGHT_KERNELS) <= set(configs.WEIGHT_FORMATS)
    assert {r[0] for r in rows if r[6]} == set(configs.SMALL_M_KERNELS)
    only = list(aot_check.variants(kernels=["lora_shrink_kernel"], ranks=[32]))
    assert len(only) == len(aot_check.DTYPE_PAIRS) and all(v[:2] == ("lora_shrink_kernel", 32) for v in only)


def test_parse_res_usage():
    sample = ("\nFatbin elf code:\n================\narch = sm_90\ncode version = [1,7]\n"
              "host = linux\ncompile_size = 64bit\n\nResource usage:\n"
              " Common:\n  GLOBAL:0\n Function lora_grad_a_kernel:\n"
              "  REG:168 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    row = aot_check._parse_res_usage(sample)
    assert row == {"regs": 168, "stack": 16, "static_shared": 1024, "local": 8}
    assert aot_check.spilled({**row, "error": None})
    clean = aot_check._parse_res_usage("REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:500")
    assert clean["regs"] == 40 and not aot_check.spilled({**clean, "error": None})
    with pytest.raises(RuntimeError, match="cannot parse"):
        aot_check._parse_res_usage("cuobjdump: no such file")


_COMPILE_SCRIPT = """
import json, sys
from lora_kernels.tools import aot_check
for name, fmt, small_m in (("lora_grad_input_kernel", "dense-wT", False),
                           ("lora_forward_gemm_kernel", "nf4", True), ("lora_forward_gemm_tma_kernel", "dense", False),
                           ("lora_grad_input_tma_kernel", "dense", False)):
    print(json.dumps(aot_check.compile_one((name, 16, "bf16", "bf16", "tf32", fmt, small_m), 90)))
"""


def test_aot_compile_one_for_sm90():
    # aot_check compiles the triton.jit functions; under TRITON_INTERPRET=1 (which tests/conftest.py
    # sets without a GPU) they are InterpretedFunction objects that cannot be compiled (compile_one
    # reports "'InterpretedFunction' object has no attribute 'cache_key'"), so the compile runs in a
    # subprocess without TRITON_INTERPRET, as `python -m lora_kernels.tools.aot_check` would.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()[-4:]]
    for row in rows:
        assert row["error"] is None, row["error"]
        assert 0 < row["regs"] <= 255
        assert row["arch"] == "sm_90" and row["dynamic_shared"] >= 0
        assert not aot_check.spilled(row)  # R = 16 is a main configuration: it must not spill
    # the TMA GEMMs' descriptors become TMA copies; the pointer-based GEMM has none
    assert [row["tma"] for row in rows] == [False, False, True, True] and rows[2]["wgmma"] and rows[3]["wgmma"]
    assert rows[0]["weight"] == aot_check.TRANSPOSED_W


def test_aot_transposed_weight_signature():
    """The transposed dense W is compiled as triton.jit specializes it: stride_wn the constant 1,
    stride_wk a runtime int; the contiguous one the other way round."""
    from lora_kernels.kernels.lora_backward import lora_grad_input_kernel
    for fmt, unit, runtime in ((aot_check.TRANSPOSED_W, "stride_wn", "stride_wk"), ("dense", "stride_wk", "stride_wn")):
        sig = aot_check._signature(lora_grad_input_kernel, "bf16", "bf16", {}, fmt)
        assert sig[unit] == "constexpr" and sig[runtime] == "i32", fmt
        assert unit in aot_check.unit_stride_args(fmt) and runtime not in aot_check.unit_stride_args(fmt)


def test_aot_toolchain_names_triton_and_its_ptxas():
    import triton

    tools = aot_check.toolchain()
    assert tools.startswith(f"triton {triton.__version__}, ptxas ")
    assert re.fullmatch(r"\d+\.\d+", tools.rsplit(" ", 1)[1])  # triton wheels bundle ptxas


def test_aot_check_flags_shared_memory_over_the_gpu_limit():
    row = {"arch": "sm_90", "error": None, "dynamic_shared": 262144, "static_shared": 0}
    assert aot_check.over_shared_limit(row)  # the 256 KiB the per-element NF4 decode once asked for
    assert not aot_check.over_shared_limit({**row, "dynamic_shared": 131072})
    assert aot_check.over_shared_limit({**row, "arch": "sm_80", "dynamic_shared": 200000})
    assert not aot_check.over_shared_limit({**row, "error": "CompilationError"})


@pytest.mark.parametrize("arch", configs.ARCHS)
@pytest.mark.parametrize("kind", ["half", "half_lora32", "tf32"])
def test_nf4_tiles_aligned_to_quantization_blocks(arch, kind):
    # aligned weights: the tiles' K extent divides bnb's 64-blocks (the fast decode applies);
    # others keep the 32-wide reduction step the per-element decode fits in shared memory with
    for fn in (configs.forward_gemm_config, configs.grad_input_config, configs.fused_forward_config):
        aligned = fn(16, kind, arch, "nf4")
        assert 64 % aligned.blocks["BLOCK_K"] == 0, fn.__name__
        unaligned = fn(16, kind, arch, "nf4", nf4_aligned=False)
        red = "BLOCK_K" if fn is not configs.grad_input_config else "BLOCK_N"
        assert unaligned.blocks[red] == 32, fn.__name__
