"""``python -m lora_kernels {bench,memory,qlora,gemv,overhead,split-k,analyze,routes,all} [options]``.

bench   LoRA (dense) and QLoRA (nf4) layer timings vs PEFT, torch.compile(PEFT), unfused PyTorch,
        bitsandbytes and the base matmul (``lora_kernels.tools.bench``); ``bench --train``: tokens/s,
        peak memory and losses of full training steps of the built-in model, PEFT vs patched
        (``lora_kernels.tools.train_bench``)
memory  saved activations per module of the built-in model (``--layer``: of one layer) and, on CUDA,
        peak memory of a training step (``lora_kernels.tools.memory``)
qlora   QLoRA layer (NF4 base) vs PEFT + bitsandbytes and the dense matmul, with memory columns and
        the GPU goals (``lora_kernels.tools.qlora_bench``)
gemv    the CUDA NF4 decode GEMV (csrc/) vs bitsandbytes and the dense matmul, with and without its
        LoRA term, against the copy bandwidth (``lora_kernels.tools.gemv_bench``; needs the built extension)
overhead host time per layer call (forward, forward + backward) and Triton launches, PEFT vs patched:
        what bounds small layers and decoding on a GPU (``lora_kernels.tools.overhead``; without a GPU
        the patched layers' GPU route runs dry: launches recorded, not run)
split-k forward time with the small-M split-K path on vs off, per M: tunes SMALL_M_MAX (Triton path)
analyze rank analysis of a PEFT adapter folder: ΔW spectra, subspace similarity, base projection
        (``lora_kernels.tools.rank_analysis``)
routes  each opt-in dispatch route beside its default, from one device run's result files
        (``lora_kernels.tools.routes``)
all     the main job: bench (dense), qlora, memory (model and layer), bench --train and overhead with
        their defaults (memory and --train also with DoRA adapters), and on CUDA split-k and (when csrc/ is
        built) gemv (only --device, --dtype and --out apply)
Results go to --out, default ``benchmarks/results/<device-kind>/`` (e.g. ``cpu``, ``nvidia-h100-...``).
"""
import argparse
import os
import sys
import traceback


def main(argv=None):
    """Parse ``argv`` and run the command. A bad option value the tools reject (ValueError or
    TypeError, e.g. an unknown provider, a GEMV M above 16, a folder that is no PEFT adapter) ends
    like an argparse error: one line on stderr naming where it was raised, exit status 2."""
    # Tools are imported here, not at module level: `python -m lora_kernels --help` stays fast.
    from lora_kernels.tools import bench, gemv_bench, memory, overhead, qlora_bench, rank_analysis, routes, train_bench

    parser = argparse.ArgumentParser(prog="python -m lora_kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_bench = sub.add_parser("bench", help="timing benchmark (--train: end-to-end training steps)")
    bench.add_arguments(p_bench)
    p_bench.add_argument("--train", action="store_true",
                         help="time full training steps of the built-in model instead (options below)")
    train_group = p_bench.add_argument_group("end-to-end training (--train)")
    train_bench.add_arguments(train_group)
    memory.add_arguments(sub.add_parser("memory", help="memory profile"))
    qlora_bench.add_arguments(sub.add_parser("qlora", help="QLoRA (NF4) layer benchmark and memory"))
    gemv_bench.add_arguments(sub.add_parser("gemv", help="CUDA NF4 decode GEMV benchmark (issue 5 goals)"))
    overhead.add_arguments(sub.add_parser("overhead", help="host time per layer call, PEFT vs patched"))
    p_split = sub.add_parser("split-k", help="small-M split-K threshold sweep")
    p_split.add_argument("--device", default=None)
    p_split.add_argument("--dtype", default=None, choices=sorted(bench.DTYPES))
    p_split.add_argument("--out", default=None)
    p_split.add_argument("--reps", type=int, default=None)
    rank_analysis.add_arguments(sub.add_parser("analyze", help="rank analysis of a PEFT adapter"))
    routes.add_arguments(sub.add_parser("routes", help="opt-in dispatch routes vs their defaults, from results"))
    p_all = sub.add_parser("all", help="the main job: every benchmark and memory profile with defaults")
    p_all.add_argument("--device", default=None)
    p_all.add_argument("--dtype", default=None, choices=sorted(bench.DTYPES))
    p_all.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "bench":
            _check_bench_options(args, p_bench, train_group)
        _run(args, bench, gemv_bench, memory, overhead, qlora_bench, rank_analysis, routes, train_bench)
    except (ValueError, TypeError, OSError) as exc:  # OSError: a path that cannot be written or read
        where = traceback.extract_tb(exc.__traceback__)[-1]
        print(f"{parser.prog} {args.command}: error: {exc} (raised at {os.path.basename(where.filename)}:"
              f"{where.lineno})", file=sys.stderr)
        raise SystemExit(2) from None


def _check_bench_options(args, p_bench, train_group) -> None:
    """``bench`` and ``bench --train`` share one parser: options given to the one that does not take
    them (the layer sweep's with --train, the training group's without) are errors, not ignored."""
    shared = {"help", "train", "device", "dtype", "out", "no_plot"}
    train_dests = {action.dest for action in train_group._group_actions}
    unused = [action for action in p_bench._actions
              if action.dest not in shared and (action.dest in train_dests) != args.train]
    given = [action.option_strings[0] for action in unused if getattr(args, action.dest) != action.default]
    if given:
        where = "the layer benchmark, not to --train" if args.train else "--train only"
        raise ValueError(f"{', '.join(given)} apply to {where}")


def _run(args, bench, gemv_bench, memory, overhead, qlora_bench, rank_analysis, routes, train_bench):
    if args.command == "bench":
        (train_bench if args.train else bench).run_from_args(args)
    elif args.command == "memory":
        memory.run_from_args(args)
    elif args.command == "qlora":
        qlora_bench.run_from_args(args)
    elif args.command == "gemv":
        gemv_bench.run_from_args(args)
    elif args.command == "overhead":
        overhead.run_from_args(args)
    elif args.command == "analyze":
        rank_analysis.run_from_args(args)
    elif args.command == "routes":
        routes.run_from_args(args)
    elif args.command == "split-k":
        qlora_bench.split_k_sweep(device=args.device, dtype=args.dtype, out=args.out, reps=args.reps)
    else:
        # the NF4 table comes from qlora below (its default grid has the decode M values and memory columns)
        bench.run(device=args.device, dtype=args.dtype, out=args.out, families=("dense",))
        memory.run(device=args.device, dtype=args.dtype, out=args.out)  # the built-in model
        memory.run(device=args.device, dtype=args.dtype, out=args.out, layer=True)  # one layer per shape
        qlora_bench.run(device=args.device, dtype=args.dtype, out=args.out)
        train_bench.run(device=args.device, dtype=args.dtype, out=args.out)
        overhead.run(device=args.device, dtype=args.dtype, out=args.out)  # host time per layer call
        # DoRA (PEFT use_dora=True) models: saved activations and training steps, PEFT vs patched
        memory.run(device=args.device, dtype=args.dtype, out=args.out, dora=True)
        train_bench.run(device=args.device, dtype=args.dtype, out=args.out, dora=True)
        device, _ = bench.resolve_device_dtype(args.device, args.dtype)
        if device.type == "cuda":  # the CPU default path is PyTorch: there is no split-K to tune
            qlora_bench.split_k_sweep(device=args.device, dtype=args.dtype, out=args.out)
            from lora_kernels.ops.nf4_gemv import load_extension
            if load_extension():  # the CUDA GEMV is built on this machine
                gemv_bench.run(device=args.device, dtype=args.dtype, out=args.out)


if __name__ == "__main__":
    main()
