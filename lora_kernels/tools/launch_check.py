"""Check the fast launch path (``ops.launch``) against Triton's own dispatch, without a GPU:

    python -m lora_kernels.tools.launch_check        (TRITON_INTERPRET unset)

Runs every launcher route a CPU dry run reaches (``tools.dry_run``: Triton compiles for sm_90,
launches are recorded) with LORA_KERNELS_FAST_LAUNCH=check, so that every fast launch asks Triton
which compiled kernel and argument values it would launch and raises on a difference. Inputs vary
what Triton specializes on: dtypes (fp32, bf16, fp16 x with fp32 adapters), sizes (M = 1: split-K;
M = 17; M = 64: the NF4 slab route), 16-byte aligned and misaligned x, row- and column-major x,
bias, dropout, dense and NF4 weights, forward and backward. The scenarios run once, then twice
more in interleaved orders, so that a key too coarse would hand one scenario another's kernel.
Prints one JSON line: fast launches checked, launches of the first pass, kernels seen; exit status
1 on a mismatch. CI runs it with triton 3.9 (tests/ops/test_launch.py) and 3.6 (the GPU machine's;
``make aot-check-old-triton``).
"""
import json
import sys


def scenarios() -> list:
    """Callables, each one launcher call (its inputs made here, fixed across calls)."""
    import torch
    from lora_kernels.ops import triton_launch as T
    from lora_kernels.ops.nf4 import NF4Weight

    out = []
    g = torch.Generator().manual_seed(0)
    cases = ((torch.float32, torch.float32, 1, 64, 96), (torch.float32, torch.float32, 64, 128, 64),
             (torch.bfloat16, torch.bfloat16, 17, 64, 96), (torch.float16, torch.float32, 64, 64, 96))
    for dt, adt, M, K, N in cases:
        r = 8
        xs = torch.randn(M, K + 8, generator=g).to(dt)
        for x in (xs[:, :K], xs[:, 8:], xs[:, 1:K + 1], xs[:, :K].t().contiguous().t()):
            W = torch.randn(N, K, generator=g).to(dt)
            A = torch.randn(r, K, generator=g).to(adt)
            B = torch.randn(N, r, generator=g).to(adt)
            bias = torch.randn(N, generator=g).to(dt)
            seed = torch.tensor([7], dtype=torch.int64)
            gy = torch.randn(M, N, generator=g).to(dt)
            h = torch.randn(M, r, generator=g).to(adt)
            wq = T.NF4Tensors.of(NF4Weight.quantize(W))
            out += [
                lambda x=x, W=W, A=A, B=B, bias=bias: T.triton_lora_forward(x, W, A, B, bias, 2.0, 0.0, None),
                lambda x=x, W=W, A=A, B=B, seed=seed: T.triton_lora_forward(x, W, A, B, None, 0.5, 0.25, seed),
                lambda x=x, A=A, B=B, wq=wq: T.triton_lora_forward(x, wq.packed, A, B, None, 2.0, 0.0, None, wq=wq),
                lambda x=x, W=W, A=A, B=B, h=h, gy=gy: T.triton_lora_backward(gy, x, W, A, B, h, None, 2.0, 0.0,
                                                                             True, True, True, True),
                lambda x=x, A=A, B=B, h=h, gy=gy, wq=wq, seed=seed: T.triton_lora_backward(
                    gy, x, wq.packed, A, B, h, seed, 2.0, 0.1, True, False, True, False, wq=wq),
            ]
    return out


def run() -> dict:
    from lora_kernels.ops import launch as launch_mod
    from lora_kernels.tools.dry_run import dry_run

    launch_mod.MODE[0] = "check"
    with dry_run() as launches:
        calls = scenarios()
        for call in calls:
            call()
        first = sum(launches.values())
        for call in calls + calls[::-1]:
            call()
    return {"checked": launch_mod.CHECKED_LAUNCHES[0], "first": first, "kernels": sorted(launches)}


def main() -> int:
    try:
        result = run()
    except RuntimeError as exc:
        print(f"launch_check: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0 if result["checked"] >= 2 * result["first"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
