"""Ahead-of-time compile every Triton kernel configuration the launchers can pick, for sm_80 and
sm_90, without a GPU, and report registers / shared memory / spills from cuobjdump -res-usage.

Per kernel, padded rank R, (x dtype, adapter dtype) pair and base-weight format (dense, or NF4 with
double quantization for the kernels that read W), the variant compiled is the one with every
optional feature switched on (bias, dropout, all gradients): it holds the most live values, so it
bounds register pressure; the feature-off variants run under the interpreter in the tests. The NF4
decode kernels (flat, and the slab decode) are compiled once per stored dtype.
Exit status 1 on any compile error, on spills in a main configuration (R <= 64), or on a
configuration needing more shared memory than the GPU family has (``SHARED_LIMIT``).

    python -m lora_kernels.tools.aot_check [--arch 80 90] [--kernels NAME ...] [--ranks 16 ...]
"""
import argparse
import concurrent.futures
import importlib
import os
import re
import subprocess
import sys
import tempfile

DTYPE_PAIRS = (  # (x dtype, adapter dtype, fp32 dot precision)
    ("fp16", "fp16", "tf32"), ("bf16", "bf16", "tf32"), ("bf16", "fp32", "tf32"),
    ("fp16", "fp32", "tf32"), ("fp32", "fp32", "tf32"), ("fp32", "fp32", "ieee"),
)
ARCH_FAMILY = {80: 80, 86: 80, 89: 80, 90: 90}
X_DTYPE_ARGS = {"x_ptr", "w_ptr", "y_ptr", "dy_ptr", "dx_ptr"}
ADAPTER_DTYPE_ARGS = {"a_ptr", "b_ptr", "h_ptr"}
FP32_ARGS = {"dh_ws_ptr", "db_ws_ptr", "colsum_ws_ptr", "da_ws_ptr", "dh_ptr", "bias_ptr",
             "scale", "keep_scale"}
# Innermost strides of contiguous tensors: triton.jit specializes an int argument equal to 1 as the
# constant 1, so the AOT compile does the same (it decides vectorised, pipelined loads).
UNIT_STRIDE_ARGS = {"stride_xk", "stride_ak", "stride_hr", "stride_wk", "stride_br", "stride_yn",
                    "stride_dyn", "stride_dhr", "stride_dxk"}
# A dense W [N, K] that is the transposed view of a contiguous [K, N] weight (transformers' Conv1D, as
# the PEFT patch passes it): unit stride along N instead of K, a specialization of its own.
TRANSPOSED_W = "dense-wT"
ALL_ON_FLAGS = {"HAS_BIAS": True, "HAS_DROPOUT": True, "NEED_DH": True, "NEED_DB": True,
                "NEED_COLSUM": True, "UPCAST_DOT": False}
NF4_PTR_ARGS = ("wq_absmax_ptr", "wq_absmax_code_ptr", "wq_absmax_scale_ptr", "wq_absmax_offset_ptr",
                "wq_code_ptr")
DEQUANT_KERNEL = "nf4_dequantize_kernel"
SLAB_KERNEL = "nf4_dequantize_tiles_kernel"  # the aligned slab decode of the large-M NF4 path
DECODE_KERNELS = (DEQUANT_KERNEL, SLAB_KERNEL)
# TMA descriptor arguments: their block shape, by constexpr name.
TMA_DESCRIPTOR_BLOCKS = {"x_desc": ("BLOCK_M", "BLOCK_K"), "w_desc": ("BLOCK_N", "BLOCK_K"),
                         "dy_desc": ("BLOCK_M", "BLOCK_N")}


def variants(kernels=None, ranks=None):
    """Yield (kernel_name, R, x_dtype, adapter_dtype, precision, weight_format, small_m) for every
    launchable config (the dequantize kernel: R = 0, x_dtype = the stored dtype)."""
    from lora_kernels.kernels import configs
    for name in configs.KERNEL_CONFIGS:
        if kernels and name not in kernels:
            continue
        for R in configs.PADDED_RANKS:
            if ranks and R not in ranks:
                continue
            for x_dtype, adapter_dtype, precision in DTYPE_PAIRS:
                for weight_format in aot_weight_formats(name):
                    for small_m in ((False, True) if name in configs.SMALL_M_KERNELS else (False,)):
                        yield name, R, x_dtype, adapter_dtype, precision, weight_format, small_m
    for name in DECODE_KERNELS:
        if not kernels or name in kernels:
            for stored in ("bf16", "fp16", "fp32"):
                yield name, 0, stored, "-", "-", "nf4", False


TL_DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def aot_weight_formats(name: str) -> tuple:
    """The base-weight formats kernel ``name`` is compiled for: its ``configs.WEIGHT_FORMATS``, NF4
    both aligned ("nf4": the fast tile decode) and not ("nf4-unaligned": per-element decode, its own
    tiles), since the launchers pick either by the weight's shape, and a dense W both contiguous
    ("dense") and, for ``configs.TRANSPOSED_WEIGHT_KERNELS``, transposed (``TRANSPOSED_W``)."""
    from lora_kernels.kernels import configs
    extra = {"nf4": ("nf4", "nf4-unaligned"),
             "dense": ("dense", TRANSPOSED_W) if name in configs.TRANSPOSED_WEIGHT_KERNELS else ("dense",)}
    return tuple(f for fmt in configs.WEIGHT_FORMATS.get(name, ("dense",)) for f in extra.get(fmt, (fmt,)))


def unit_stride_args(weight_format: str) -> set:
    """The stride arguments a variant's tensors have equal to 1 (``UNIT_STRIDE_ARGS``; W's along N for a
    transposed dense weight)."""
    if weight_format == TRANSPOSED_W:
        return (UNIT_STRIDE_ARGS - {"stride_wk"}) | {"stride_wn"}
    return UNIT_STRIDE_ARGS


def _weight_constexprs(fn, x_dtype: str, weight_format: str) -> dict:
    """Constexprs of the base-weight format; dense variants get None for the NF4 pointers."""
    import triton.language as tl
    if "W_NF4" not in fn.arg_names:
        return {}
    nf4 = weight_format.startswith("nf4")
    out = {"W_NF4": nf4, "QBLOCK": 64, "QBLOCK2": 256, "DOUBLE_QUANT": nf4,
           "W_STORED_DTYPE": getattr(tl, TL_DTYPE_NAMES[x_dtype]), "NF4_ALIGNED": weight_format == "nf4"}
    if not nf4:
        out.update({arg: None for arg in NF4_PTR_ARGS})
    return out


def _signature(fn, x_dtype, adapter_dtype, constexprs, weight_format="dense", small_m=False):
    """Argument types as triton.jit would infer them for contiguous tensors and 16-aligned sizes."""
    sig = {}
    unit_strides = unit_stride_args(weight_format)
    for arg in fn.arg_names:
        if arg in constexprs or arg in unit_strides:
            sig[arg] = "constexpr"
        elif arg in TMA_DESCRIPTOR_BLOCKS:  # host-made TMA descriptor of a 16-byte-aligned x or W
            sig[arg] = f"tensordesc<{x_dtype}[{', '.join(str(constexprs[b]) for b in TMA_DESCRIPTOR_BLOCKS[arg])}]>"
        elif weight_format.startswith("nf4") and arg in ("w_ptr", "packed_ptr", "wq_absmax_ptr", "absmax_ptr"):
            sig[arg] = "*u8"  # packed codes; double-quantized absmax
        elif arg in ("out_ptr",):
            sig[arg] = "*" + x_dtype
        elif small_m and arg == "y_ptr":
            sig[arg] = "*fp32"  # split-K partials
        elif arg in NF4_PTR_ARGS or arg.startswith("absmax_") or arg == "code_ptr":
            sig[arg] = "*fp32"
        elif arg in X_DTYPE_ARGS:
            sig[arg] = "*" + x_dtype
        elif arg in ADAPTER_DTYPE_ARGS:
            sig[arg] = "*" + adapter_dtype
        elif arg == "seed_ptr":
            sig[arg] = "*i64"
        elif arg in FP32_ARGS:
            sig[arg] = ("*fp32" if arg.endswith("_ptr") else "fp32")
        else:
            sig[arg] = "i32"
    return sig


def _attrs(fn, sig):
    """16-byte-aligned pointers and 16-divisible ints, as the JIT's specialization would mark them."""
    return {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
            if sig[arg].startswith("*") or sig[arg] == "i32"}


def _parse_res_usage(text: str) -> dict:
    match = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if not match:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{text}")
    reg, stack, shared, local = map(int, match.groups())
    return {"regs": reg, "stack": stack, "static_shared": shared, "local": local}


def compile_one(variant, arch: int) -> dict:
    """Compile one variant for sm_<arch>; returns a result row (error text instead on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lora_kernels.kernels import configs

    name, R, x_dtype, adapter_dtype, precision, weight_format, small_m = variant
    if name in DECODE_KERNELS:
        import triton.language as tl
        fn = getattr(importlib.import_module("lora_kernels.kernels.nf4"), name)
        cfg = configs.nf4_dequantize_config() if name == DEQUANT_KERNEL else configs.nf4_dequantize_tiles_config(64)
        constexprs = {"QBLOCK": 64, "QBLOCK2": 256, "DOUBLE_QUANT": True, **cfg.blocks,
                      "STORED_DTYPE": getattr(tl, TL_DTYPE_NAMES[x_dtype])}
    else:
        module_name, config_fn = configs.KERNEL_CONFIGS[name]
        fn = getattr(importlib.import_module(module_name), name)
        kind = configs.dot_kind(x_dtype == "fp32", adapter_dtype == "fp32", precision)
        extra = {"small_m": True} if small_m else {}
        if weight_format == "nf4-unaligned":
            extra["nf4_aligned"] = False
        cfg = (config_fn(R, kind, ARCH_FAMILY.get(arch, 90), weight_format.split("-")[0], **extra)
               if name in configs.WEIGHT_FORMATS else config_fn(R, kind, ARCH_FAMILY.get(arch, 90)))
        constexprs = {"R": R, "DOT_PRECISION": precision, "LORA_FP32": adapter_dtype == "fp32", "SPLIT_K": small_m,
                      "LORA_PRECISION": precision if (x_dtype == "fp32" or adapter_dtype != "fp32") else "tf32",
                      **ALL_ON_FLAGS, **cfg.blocks, **_weight_constexprs(fn, x_dtype, weight_format)}
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    constexprs.update({k: 1 for k in unit_stride_args(weight_format) if k in fn.arg_names})
    row = {"kernel": name, "R": R, "x": x_dtype, "adapter": adapter_dtype, "precision": precision,
           "weight": weight_format + ("/smallM" if small_m else ""), "arch": f"sm_{arch}", "warps": cfg.num_warps, "stages": cfg.num_stages,
           "blocks": " ".join(f"{k}={v}" for k, v in cfg.blocks.items())}
    # As the launches: FMA contraction off for kernels decoding NF4 (bit-exact absmax decode), else on.
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
               "enable_fp_fusion": not weight_format.startswith("nf4")}
    try:
        sig = _signature(fn, x_dtype, adapter_dtype, constexprs, weight_format, small_m)
        src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                        _attrs(fn, sig))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True,
                                 check=True).stdout
        row.update(_parse_res_usage(out))
        row["dynamic_shared"] = compiled.metadata.shared
        row["wgmma"] = "wgmma" in compiled.asm["ptx"]
        row["tma"] = "cp.async.bulk.tensor" in compiled.asm["ptx"]  # tiles loaded by the TMA unit
        row["error"] = None
    except Exception as exc:  # reported in the table, turned into a failing exit status
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return row


def toolchain() -> str:
    """"triton X, ptxas Y": the compiler versions the table was made with (ptxas is triton's own)."""
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    try:
        out = subprocess.run([ptxas, "--version"], capture_output=True, text=True, check=True).stdout
        match = re.search(r"release (\d+\.\d+)", out)
        version = match.group(1) if match else "unknown"
    except (OSError, subprocess.CalledProcessError):
        version = "not found"
    return f"triton {triton.__version__}, ptxas {version}"


def launchable(variant, arch: int) -> bool:
    """False for the variants a launcher never runs (``configs.LAUNCH_LIMITS``)."""
    from lora_kernels.kernels import configs

    name, R, x_dtype, adapter_dtype, precision = variant[:5]
    limit = configs.LAUNCH_LIMITS.get(name)
    if limit is None:
        return True
    kind = configs.dot_kind(x_dtype == "fp32", adapter_dtype == "fp32", precision)
    return limit(R, kind, ARCH_FAMILY.get(arch, 90))


def _worker(args):
    return compile_one(*args)


def run(archs=(80, 90), kernels=None, ranks=None, jobs=None) -> list:
    """Compile all variants for all archs in a process pool; returns the result rows."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    tasks = [(v, a) for v in variants(kernels, ranks) for a in archs if launchable(v, a)]
    jobs = jobs or max(1, min(len(tasks), os.cpu_count() or 1))
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_worker, tasks))


# Shared memory one block may use (bytes): sm_90 (H100/H200) 227 KiB; sm_80 (A100) 163 KiB. A launch
# needing more fails with OutOfResources, which a compile alone does not report.
SHARED_LIMIT = {80: 166912, 90: 232448}


def over_shared_limit(row) -> bool:
    arch = int(row["arch"].removeprefix("sm_"))
    return row.get("error") is None and \
        row["dynamic_shared"] + row["static_shared"] > SHARED_LIMIT[ARCH_FAMILY.get(arch, 90)]


def is_main(row) -> bool:
    from lora_kernels.kernels.configs import MAIN_MAX_PADDED_RANK
    return row["R"] <= MAIN_MAX_PADDED_RANK


def spilled(row) -> bool:
    # Triton kernels make no calls, so any stack frame or local memory is register spill.
    return row.get("error") is None and (row["stack"] > 0 or row["local"] > 0)


def format_table(rows) -> str:
    head = f"{'kernel':27} {'W':20} {'R':>3} {'x/adapter':11} {'prec':4} {'arch':5} {'w':>2} {'s':>2} " \
           f"{'regs':>4} {'smem KiB':>8} {'spill B':>7} {'wgmma':5} status"
    lines = [head, "-" * len(head)]
    for row in rows:
        if row["error"]:
            status, regs, smem, spill, mma = "COMPILE ERROR " + row["error"], "-", "-", "-", "-"
        else:
            regs = row["regs"]
            smem = f"{(row['dynamic_shared'] + row['static_shared']) / 1024:.1f}"
            spill = row["stack"] + row["local"]
            mma = "yes" if row["wgmma"] else "no"
            status = ("SPILL" if is_main(row) else "spill (not main)") if spilled(row) else "ok"
            if over_shared_limit(row):
                status = "SHARED MEMORY OVER THE LIMIT"
        lines.append(f"{row['kernel']:27} {row['weight']:20} {row['R']:>3} {row['x'] + '/' + row['adapter']:11} "
                     f"{row['precision']:4} {row['arch']:5} {row['warps']:>2} {row['stages']:>2} "
                     f"{regs:>4} {smem:>8} {spill:>7} {mma:5} {status}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--kernels", nargs="+")
    parser.add_argument("--ranks", type=int, nargs="+")
    parser.add_argument("--jobs", type=int)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    tools = toolchain()
    rows = run(args.arch, args.kernels, args.ranks, args.jobs)
    print(tools)
    print(format_table(rows))
    if args.json:
        import json

        from lora_kernels.tools.bench import environment_metadata
        meta = dict(environment_metadata(), targets=[f"sm_{a}" for a in args.arch], toolchain=tools)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    errors = [r for r in rows if r["error"]]
    main_spills = [r for r in rows if spilled(r) and is_main(r)]
    over = [r for r in rows if over_shared_limit(r)]
    print(f"\n{len(rows)} compiles: {len(errors)} errors, {len(main_spills)} main configurations spill, "
          f"{sum(spilled(r) for r in rows) - len(main_spills)} other configurations spill, "
          f"{len(over)} need more shared memory than the GPU has")
    return 1 if errors or main_spills or over else 0


if __name__ == "__main__":
    sys.exit(main())
