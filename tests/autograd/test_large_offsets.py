"""Element offsets past 2**31: a model's activations grow past 2**31 elements at long sequences
(262144 tokens x 8192 features), and every kernel must compute its addresses in 64 bits there; in 32
bits they wrap and read or write elsewhere (another row, or outside the tensor: a crash).

Cheaply tested with views: x and dY of three rows each, whose row stride (~2**30 elements) puts their
last row past element 2**31 of a buffer that is mostly never touched (host memory: virtual only).
Outputs and gradients must equal those of contiguous copies of the same values bit for bit (same
kernels, same dropout mask: it depends on the element's index, not its address) and float64 to the
dtype's bound. An address computed in 32 bits makes a wrong value or a crash, so each backend runs in
a subprocess: a crash fails this test instead of the test run (or, on a GPU, the CUDA context).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import BOUNDS, backend_available

ROW_STRIDE = (1 << 30) + 8  # 2 rows past it is element 2**31 + 16; not a multiple of 16, like K below
M, K, N, R = 3, 40, 24, 4

SCRIPT = r"""
import json, sys
import torch
import lora_kernels
import lora_kernels.ops.lora_linear as ops_impl
import lora_kernels.ops.nf4_lora_linear as nf4_ops_impl

ran = []  # the implementations called (tests.helpers.use_backend's spy, without pytest)
for module in (ops_impl, nf4_ops_impl):
    for name in ("triton_lora_forward", "torch_lora_forward", "triton_lora_backward", "torch_lora_backward"):
        def spy(*args, _fn=getattr(module, name), _name=name, **kwargs):
            ran.append(_name)
            return _fn(*args, **kwargs)
        setattr(module, name, spy)

device, M, K, N, R, stride = sys.argv[1], *map(int, sys.argv[2:])
dtype = torch.float16
g = torch.Generator().manual_seed(0)

def randn(*shape, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

def far_rows(values):
    # [rows, cols] view of a buffer whose rows are `stride` elements apart (the last past 2**31)
    rows, cols = values.shape
    view = torch.empty(stride * (rows - 1) + cols, dtype=dtype, device=device).as_strided((rows, cols), (stride, 1))
    view.copy_(values)
    return view

x_values, gy_values = randn(M, K), randn(M, N)
weight, lora_A, lora_B, bias = randn(N, K, scale=K ** -0.5), randn(R, K, scale=K ** -0.5), randn(N, R), randn(N)
qweight = lora_kernels.NF4Weight.quantize(weight)
dense_weight = {"dense": weight, "nf4": qweight.to("cpu").dequantize().to(device)}  # bnb's decode (CPU path)
result = {}
for fmt in ("dense", "nf4"):
    for p in (0.0, 0.3):
        runs = []
        for far in (True, False):
            x = (far_rows(x_values) if far else x_values.clone()).requires_grad_(True)
            gy = far_rows(gy_values) if far else gy_values.clone()
            A, B = lora_A.clone().requires_grad_(True), lora_B.clone().requires_grad_(True)
            torch.manual_seed(7)
            if fmt == "dense":
                y = lora_kernels.lora_linear(x, weight, A, B, 2.0, bias=bias, dropout_p=p)
            else:
                y = lora_kernels.nf4_lora_linear(x, qweight, A, B, 2.0, bias=bias, dropout_p=p)
            dx, dA, dB = torch.autograd.grad(y, (x, A, B), gy)
            runs.append((y, dx, dA, dB))
        key = f"{fmt}/p={p}"
        result[key + "/far_rows_equal_contiguous"] = all(torch.equal(a, b) for a, b in zip(*runs))
        if p == 0.0:
            x64, A64, B64 = (t.double().cpu().requires_grad_(True) for t in (x_values, lora_A, lora_B))
            y64 = x64 @ dense_weight[fmt].double().cpu().t() + bias.double().cpu() + 2.0 * (x64 @ A64.t()) @ B64.t()
            grads64 = torch.autograd.grad(y64, (x64, A64, B64), gy_values.double().cpu())
            for name, out, ref in zip(("y", "dx", "dA", "dB"), runs[0], (y64,) + grads64):
                result[f"{key}/rel_err_{name}"] = ((out.double().cpu() - ref).norm() / ref.norm()).item()
result["implementations"] = sorted(set(ran))
print("RESULT " + json.dumps(result))
"""


@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
def test_rows_past_2_31_elements(backend_name):
    reason = backend_available(backend_name)
    if reason:
        pytest.skip(reason)
    env = dict(os.environ)
    # the Triton kernels at every M (on CUDA the small-M dense calls otherwise take PyTorch ops)
    env.update(LORA_KERNELS_CPU_BACKEND="triton", LORA_KERNELS_DENSE_TORCH_MAX_M="0")
    device = "cuda" if backend_name == "cuda" else "cpu"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, device, str(M), str(K), str(N), str(R), str(ROW_STRIDE)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result.pop("implementations") == ["triton_lora_backward", "triton_lora_forward"]
    assert len(result) == 2 * 2 + 2 * 4
    for key, value in result.items():
        if key.endswith("far_rows_equal_contiguous"):
            assert value is True, key
        else:
            assert value <= BOUNDS[torch.float16], (key, value)
