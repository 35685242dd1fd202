"""``python -m lora_kernels {bench,memory,all} [options]``.

bench   fwd/bwd timings vs PEFT, unfused PyTorch and the base linear (``lora_kernels.tools.bench``)
memory  saved activations and, on CUDA, peak memory (``lora_kernels.tools.memory``)
qlora   QLoRA layer (NF4 base) vs PEFT + bitsandbytes and the dense matmul (``lora_kernels.tools.qlora_bench``)
all     the three with their defaults (only --device, --dtype and --out apply)
Results go to --out, default ``benchmarks/results/<device-kind>/`` (e.g. ``cpu``, ``nvidia-h100-...``).
"""
import argparse


def main(argv=None):
    # Tools are imported here, not at module level: `python -m lora_kernels --help` stays fast.
    from lora_kernels.tools import bench, memory, qlora_bench

    parser = argparse.ArgumentParser(prog="python -m lora_kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench.add_arguments(sub.add_parser("bench", help="timing benchmark"))
    memory.add_arguments(sub.add_parser("memory", help="memory profile"))
    qlora_bench.add_arguments(sub.add_parser("qlora", help="QLoRA (NF4) layer benchmark and memory"))
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
    else:
        bench.run(device=args.device, dtype=args.dtype, out=args.out)
        memory.run(device=args.device, dtype=args.dtype, out=args.out)
        qlora_bench.run(device=args.device, dtype=args.dtype, out=args.out)


if __name__ == "__main__":
    main()
