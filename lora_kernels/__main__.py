"""``python -m lora_kernels {bench,memory,qlora,split-k,analyze,all} [options]``.

bench   fwd/bwd timings vs PEFT, unfused PyTorch and the base linear (``lora_kernels.tools.bench``)
memory  saved activations and, on CUDA, peak memory (``lora_kernels.tools.memory``)
qlora   QLoRA layer (NF4 base) vs PEFT + bitsandbytes and the dense matmul (``lora_kernels.tools.qlora_bench``)
split-k forward time with the small-M split-K path on vs off, per M: tunes SMALL_M_MAX (Triton path)
analyze rank analysis of a PEFT adapter folder: ΔW spectra, subspace similarity, base projection
        (``lora_kernels.tools.rank_analysis``)
all     bench, memory and qlora with their defaults, and split-k where the Triton path runs
        (only --device, --dtype and --out apply)
Results go to --out, default ``benchmarks/results/<device-kind>/`` (e.g. ``cpu``, ``nvidia-h100-...``).
"""
import argparse


def main(argv=None):
    # Tools are imported here, not at module level: `python -m lora_kernels --help` stays fast.
    from lora_kernels.tools import bench, memory, qlora_bench, rank_analysis

    parser = argparse.ArgumentParser(prog="python -m lora_kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench.add_arguments(sub.add_parser("bench", help="timing benchmark"))
    memory.add_arguments(sub.add_parser("memory", help="memory profile"))
    qlora_bench.add_arguments(sub.add_parser("qlora", help="QLoRA (NF4) layer benchmark and memory"))
    p_split = sub.add_parser("split-k", help="small-M split-K threshold sweep")
    p_split.add_argument("--device", default=None)
    p_split.add_argument("--dtype", default=None, choices=sorted(bench.DTYPES))
    p_split.add_argument("--out", default=None)
    p_split.add_argument("--reps", type=int, default=None)
    rank_analysis.add_arguments(sub.add_parser("analyze", help="rank analysis of a PEFT adapter"))
    p_all = sub.add_parser("all", help="bench, memory and qlora with defaults")
    p_all.add_argument("--device", default=None)
    p_all.add_argument("--dtype", default=None, choices=sorted(bench.DTYPES))
    p_all.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    if args.command == "bench":
        bench.run_from_args(args)
    elif args.command == "memory":
        memory.run_from_args(args)
    elif args.command == "qlora":
        qlora_bench.run_from_args(args)
    elif args.command == "analyze":
        rank_analysis.run_from_args(args)
    elif args.command == "split-k":
        qlora_bench.split_k_sweep(device=args.device, dtype=args.dtype, out=args.out, reps=args.reps)
    else:
        bench.run(device=args.device, dtype=args.dtype, out=args.out)
        memory.run(device=args.device, dtype=args.dtype, out=args.out)
        qlora_bench.run(device=args.device, dtype=args.dtype, out=args.out)
        device, _ = bench.resolve_device_dtype(args.device, args.dtype)
        if device.type == "cuda":  # the CPU default path is PyTorch: there is no split-K to tune
            qlora_bench.split_k_sweep(device=args.device, dtype=args.dtype, out=args.out)


if __name__ == "__main__":
    main()
