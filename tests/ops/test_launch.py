"""ops.launch: the fast launch path picks the compiled kernel and argument values Triton would.

The key must separate whatever Triton's specialization separates: checked in-process against
Triton's own binder for the argument kinds our launchers pass (hypothesis over ints, tensors at
every alignment), and end to end in a subprocess that runs the launchers' GPU route dry
(tools.dry_run, no interpreter) with LORA_KERNELS_FAST_LAUNCH=check, where every fast launch asks
Triton for its choice and raises on a difference."""
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lora_kernels.ops import launch as launch_mod

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _key(a):
    return launch_mod._args_key((a,))[0]


def _kernel_params(a, b, c):  # the signature the binder below specializes (never launched)
    pass


@pytest.fixture(scope="module")
def triton_binder():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = JITFunction(_kernel_params)
    binder = create_function_from_signature(fn.signature, fn.params, make_backend(GPUTarget("cuda", 90, 32)))
    return lambda *args: binder(*args)[1]


INTS = st.one_of(st.integers(-(1 << 40), 1 << 40), st.sampled_from([0, 1, 2, 15, 16, 17, 32, -16, (1 << 31) - 16,
                                                                     (1 << 31), -(1 << 31), -(1 << 31) - 16,
                                                                     (1 << 63) - 16, 1 << 63, (1 << 64) - 16]))


@settings(max_examples=300, deadline=None)
@given(a=INTS, b=INTS)
def test_int_keys_separate_what_triton_separates(triton_binder, a, b):
    # the key may be finer than Triton's specialization, never coarser
    if _key(a) == _key(b):
        assert triton_binder(a, 0, 0)[0] == triton_binder(b, 0, 0)[0], (a, b)


@settings(max_examples=60, deadline=None)
@given(offsets=st.tuples(st.integers(0, 7), st.integers(0, 7)),
       dtypes=st.tuples(*[st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.uint8])] * 2))
def test_tensor_keys_separate_what_triton_separates(triton_binder, offsets, dtypes):
    a, b = (torch.empty(64, dtype=dt)[off:] for off, dt in zip(offsets, dtypes))
    if _key(a) == _key(b):
        assert triton_binder(a, 0, 0)[0] == triton_binder(b, 0, 0)[0]
    # and the key does separate alignment and dtype
    assert (_key(a) == _key(b)) == (
        a.dtype == b.dtype and (a.data_ptr() % 16 == 0) == (b.data_ptr() % 16 == 0))


def test_other_argument_kinds():
    key = _key
    assert key(None) is type(None) and key(0.5) is float and key(True) != key(False)
    assert key(torch.nn.Parameter(torch.empty(4))) == key(torch.empty(4))
    with pytest.raises(launch_mod._NotKeyable):
        key((1, 2))  # a tuple argument: the launch takes kernel[grid] instead
    assert launch_mod._no_hooks(None)
    assert not launch_mod._no_hooks(lambda *a: None)


def test_interpreted_kernels_take_kernel_grid():
    # under TRITON_INTERPRET=1 (tests/conftest.py) our kernels are not JITFunctions: launch() must
    # hand them to kernel[grid] unchanged, which every kernel test here goes through
    from lora_kernels.kernels.lora_forward import lora_shrink_kernel
    from lora_kernels.ops.triton_launch import is_interpreted

    if not is_interpreted():
        pytest.skip("kernels are compiled here")
    seen = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((grid, args, kwargs))

    launch_mod.launch(Kernel(), (3, 1), 1, 2, BLOCK=4)
    assert seen == [((3, 1), (1, 2), {"BLOCK": 4})]
    assert type(lora_shrink_kernel).__name__ == "InterpretedFunction"


def test_interpreted_launches_from_several_threads_give_single_thread_results():
    """Triton's interpreter keeps a block's program id in a global and patches triton.language per
    launch: launches from several threads at once (a server's thread pool) gave wrong values and
    InterpreterErrors ("x >= grid_dim[0]") before launch() took a lock for interpreted kernels."""
    import threading
    import lora_kernels
    from lora_kernels.ops.triton_launch import is_interpreted
    from tests.helpers import use_backend

    if not is_interpreted():
        pytest.skip("kernels are compiled here")
    g = torch.Generator().manual_seed(0)
    W, A, B = torch.randn(48, 64, generator=g), torch.randn(4, 64, generator=g), torch.randn(48, 4, generator=g)
    Q = lora_kernels.NF4Weight.quantize(W, blocksize=64, double_quant=True)
    xs = [torch.randn(3 + i, 64, generator=g) for i in range(4)]
    calls = [lambda x: lora_kernels.lora_linear(x, W, A, B, 2.0), lambda x: lora_kernels.nf4_lora_linear(x, Q, A, B, 2.0)]
    with use_backend("triton") as record:
        expected = [[call(x) for call in calls] for x in xs]
        results, barrier = [None] * len(xs), threading.Barrier(len(xs))

        def work(i):
            barrier.wait()
            try:
                results[i] = [[call(xs[i]) for call in calls] for _ in range(2)]
            except Exception as e:  # noqa: BLE001 - reported below, with the thread's input
                results[i] = e
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads often: without the lock every run failed
        try:
            threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(interval)
    for i, runs in enumerate(results):
        assert not isinstance(runs, Exception), f"thread {i}: {runs!r}"
        assert all(torch.equal(y, e) for run in runs for y, e in zip(run, expected[i])), f"thread {i}"
    assert len(record.impls("fwd")) == 2 * len(xs) * 3  # every call ran the Triton kernels


def test_fast_launches_match_triton_in_a_dry_run():
    # tools.launch_check: every launcher route a CPU dry run reaches, with inputs of different
    # alignments, strides, dtypes and sizes, each fast launch checked against Triton's own choice
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])]),
               TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-m", "lora_kernels.tools.launch_check"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["checked"] >= 2 * got["first"] > 0  # every launch after the first pass went the fast way
    assert {"lora_shrink_kernel", "lora_forward_gemm_kernel", "nf4_dequantize_tiles_kernel",
            "lora_grad_out_pass_kernel", "lora_grad_input_kernel", "lora_grad_a_kernel"} <= set(got["kernels"])


def _layer_outputs(nf4: bool, M: int, seed: int = 0):
    """y, dx, dA, dB of a CUDA bf16 LoRA layer (dropout on) for inputs drawn from ``seed``."""
    import lora_kernels

    g = torch.Generator().manual_seed(seed)
    K, N, r = 320, 192, 16
    x = torch.randn(M, K, generator=g).to("cuda", torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(N, K, generator=g) / K ** 0.5).to("cuda", torch.bfloat16)
    A = (torch.randn(r, K, generator=g) / K ** 0.5).to("cuda").requires_grad_(True)
    B = torch.randn(N, r, generator=g).to("cuda").requires_grad_(True)
    bias = torch.randn(N, generator=g).to("cuda", torch.bfloat16)
    torch.manual_seed(seed)  # the dropout seed
    if nf4:
        y = lora_kernels.nf4_lora_linear(x, lora_kernels.NF4Weight.quantize(weight), A, B, 2.0, bias=bias,
                                         dropout_p=0.1)
    else:
        y = lora_kernels.lora_linear(x, weight, A, B, 2.0, bias=bias, dropout_p=0.1)
    y.backward(torch.randn(M, N, generator=g).to("cuda", torch.bfloat16))
    return [t.detach().clone() for t in (y, x.grad, A.grad, B.grad)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("M", [1, 17, 300])  # the small-M, split-K and large-M routes
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_fast_launches_equal_kernel_grid_cuda(monkeypatch, nf4, M):
    # On a GPU, the compiled launcher called directly gives what kernel[grid] gives, bit for bit (same
    # kernels, deterministic reductions).
    from collections import Counter

    monkeypatch.setitem(launch_mod.MODE, 0, "0")
    expected = _layer_outputs(nf4, M)
    for mode in ("1", "1", "check"):  # the first "1" call may still fill the fast-launch cache
        monkeypatch.setitem(launch_mod.MODE, 0, mode)
        fast = Counter()
        launch_mod.FAST_LAUNCH_COUNTERS.append(fast)
        try:
            got = _layer_outputs(nf4, M)
        finally:
            launch_mod.FAST_LAUNCH_COUNTERS.remove(fast)
        for e, o, name in zip(expected, got, ("y", "dx", "dA", "dB")):
            assert torch.equal(e, o), (mode, name)
    assert sum(fast.values()) > 0  # the last calls did go the fast way
