"""pytest-benchmark suite: one LoRA / QLoRA layer on small shapes, built from the same problem and
provider definitions as ``python -m lora_kernels bench`` (``lora_kernels.tools.bench.prepare_call``).

    pytest benchmarks/ --benchmark-json=out.json      # time every (provider, mode, shape) and save
    pytest benchmarks/ -q --benchmark-disable         # run each once (smoke test)
    pytest-benchmark compare out_old.json out.json    # regressions between saved runs

Runs on CPU (fp32, lora_kernels' PyTorch path); LORA_KERNELS_BENCH_DEVICE=cuda runs it on a GPU
(bf16, each call synchronised). Benchmarks are grouped per (family, mode, shape), so a group
compares the providers of one problem.
"""
import os

import pytest

from lora_kernels.tools import bench

DEVICE = os.environ.get("LORA_KERNELS_BENCH_DEVICE", "cpu")
# K a multiple of 64: bitsandbytes' CPU NF4 path (PEFT's QLoRA layer) needs rows that start on a block.
CASES = (bench.Case(16, 512, 512, 16), bench.Case(256, 1024, 1024, 16))
PROVIDERS = {"dense": ("lora_kernels", "peft", "torch_unfused", "base"),
             "nf4": ("lora_kernels_nf4", "peft_qlora", "base_dense")}
MODES = ("fwd", "fwdbwd")


def _params():
    for family, providers in PROVIDERS.items():
        for case in CASES:
            for mode in MODES:
                for provider in providers:
                    yield pytest.param(family, case, mode, provider, id=f"{family}-{mode}-{case.shape}-{provider}")


@pytest.mark.parametrize("family_name,case,mode,provider", list(_params()))
def test_layer(benchmark, family_name, case, mode, provider):
    family = bench.get_family(family_name)
    if not family.available([provider]):
        pytest.skip(f"{provider}: a library it needs does not import")
    device, dtype = bench.resolve_device_dtype(DEVICE)
    call = bench.prepare_call(family, case, provider, mode, device, dtype)
    benchmark.group = f"{family_name} {mode} M,K,N,r={case.shape}"
    benchmark.extra_info.update(family=family_name, provider=provider, mode=mode, M=case.M, K=case.K, N=case.N,
                                r=case.r, device=str(device), dtype=str(dtype).replace("torch.", ""),
                                flops=bench.flops(case, family, provider, mode))
    benchmark(call)
