"""Memory profile of one LoRA linear layer (same implementations as ``bench``).

(a) Saved activations of one training forward, via ``torch.autograd.graph.saved_tensors_hooks``:
    bytes and count of the tensors autograd keeps for backward, de-duplicated by storage and
    excluding parameters (the frozen weight and the adapters are stored anyway). x counts: the
    graph keeps it alive. Bytes are whole storages, so a saved view costs what it pins.
(b) On CUDA also the peak ``max_memory_allocated`` increase over one fwd+bwd (outputs and
    gradients included) and the memory still held after the forward (y + saved tensors).
Each is measured without dropout and with dropout (default p = 0.1): PEFT keeps the dropped copy
of x and its mask, lora_kernels keeps an 8-byte seed and regenerates the mask.
"""
import argparse
from pathlib import Path

import torch

from lora_kernels.tools.bench import (ALL_IMPLS, add_common_arguments, available_impls, build_impls,
                                      default_out_dir, environment_metadata, make_problem, probe,
                                      resolve_device_dtype, write_outputs, fmt_num)

CPU_SHAPES = [(2048, 1024, 1024, 16)]
CUDA_SHAPES = [(8192, 4096, 4096, 16)]
MEMORY_CSV_FIELDS = ["shape", "impl", "dropout_p", "activation_bytes", "activation_count",
                     "activation_vs_x", "peak_fwdbwd_bytes", "fwd_retained_bytes"]


def saved_activations(impl) -> tuple:
    """(bytes, count) of the non-parameter tensors one ``impl.forward()`` saves for backward."""
    param_ptrs = {t.untyped_storage().data_ptr() for t in impl.params}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        # Parameters are stored regardless of the graph; an aliasing view of one costs nothing.
        if not isinstance(t, torch.nn.Parameter) and ptr not in param_ptrs:
            storages[(t.device, ptr)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = impl.forward()
    del y
    return sum(storages.values()), len(storages)


def cuda_peak(impl, dy: torch.Tensor) -> tuple:
    """(peak fwd+bwd bytes above the starting allocation, bytes still held after the forward)."""
    dev = dy.device
    for t in impl.leaves:
        t.grad = None
    torch.cuda.synchronize(dev)
    start = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    y = impl.forward()
    torch.cuda.synchronize(dev)
    retained = torch.cuda.memory_allocated(dev) - start
    y.backward(dy)
    del y
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - start
    for t in impl.leaves:
        t.grad = None
    return peak, retained


def run(shapes=None, device=None, dtype=None, dropouts=(0.0, 0.1), out=None, impls=ALL_IMPLS,
        plot=True, verbose=True) -> dict:
    """Profiles every (M, K, N, r) in ``shapes`` (x [M, K], weight [N, K], rank r) for each dropout
    p; writes memory_<dtype>.{json,csv,png} under ``out``. Returns the results dict."""
    device, dtype = resolve_device_dtype(device, dtype)
    cuda = device.type == "cuda"
    shapes = shapes or (CUDA_SHAPES if cuda else CPU_SHAPES)
    out = Path(out) if out is not None else default_out_dir(device)
    impls = available_impls(impls)
    itemsize = torch.empty(0, dtype=dtype).element_size()

    rows, errors = [], {}
    for (M, K, N, r) in shapes:
        shape = f"{M},{K},{N},{r}"
        for p in dropouts:
            prob = make_problem(M, K, N, r, device, dtype)
            built = build_impls(prob, impls, dropout_p=p)
            dy = torch.randn(M, N, device=device, dtype=dtype)
            for name, impl in built.items():
                nbytes, count = saved_activations(impl)
                peak = retained = None
                if cuda:
                    # The probe doubles as warmup: workspaces and autotuning allocate only once.
                    err = probe(impl, dy)
                    if err is None:
                        peak, retained = cuda_peak(impl, dy)
                    else:
                        errors.setdefault(shape, {})[f"{name}@p={p}"] = err
                rows.append({"shape": shape, "M": M, "K": K, "N": N, "r": r, "impl": name,
                             "dropout_p": p, "activation_bytes": nbytes, "activation_count": count,
                             "activation_mib": nbytes / 2 ** 20,
                             "activation_vs_x": nbytes / (M * K * itemsize),
                             "peak_fwdbwd_bytes": peak, "fwd_retained_bytes": retained})
            del built, prob, dy
    result = {"metadata": environment_metadata(device, dtype),
              "config": {"dropouts": list(dropouts), "impls": list(impls),
                         "activation_bytes": "saved tensors, storage-deduplicated, parameters excluded"},
              "rows": rows, "errors": errors}
    stem = f"memory_{result['metadata']['dtype']}"
    write_outputs(result, out, stem, MEMORY_CSV_FIELDS, _plot_memory if plot else None)
    if verbose:
        print(format_table(rows, result["metadata"]))
        print(f"wrote {out}/{stem}.{{json,csv,png}}")
    return result


def format_table(rows, meta) -> str:
    """Fixed-width text table of memory rows (MiB)."""
    mib = lambda v: None if v is None else v / 2 ** 20  # noqa: E731
    lines = [f"{meta['device']}  {meta['dtype']}  torch {meta['torch']}  peft {meta['peft']}",
             f"{'shape M,K,N,r':<22}{'impl':<17}{'p':>5}{'saved MiB':>11}{'#':>4}{'/ x':>7}"
             f"{'peak MiB':>10}"]
    for r in rows:
        lines.append(f"{r['shape']:<22}{r['impl']:<17}{r['dropout_p']:>5.2f}"
                     f"{fmt_num(mib(r['activation_bytes']), '11.3f')}{r['activation_count']:>4d}"
                     f"{fmt_num(r['activation_vs_x'], '7.3f')}{fmt_num(mib(r['peak_fwdbwd_bytes']), '10.1f')}")
    return "\n".join(lines)


def _plot_memory(result, path):
    import matplotlib.pyplot as plt

    rows = result["rows"]
    groups = list(dict.fromkeys((r["shape"], r["dropout_p"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    metrics = [("activation_bytes", "saved activations (MiB)")]
    if any(r["peak_fwdbwd_bytes"] is not None for r in rows):
        metrics.append(("peak_fwdbwd_bytes", "peak fwd+bwd increase (MiB)"))
    width = 0.8 / max(len(impls), 1)
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(6, 2.5 * len(groups) + 2) * len(metrics), 4),
                             squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        for j, impl in enumerate(impls):
            vals = [next(((r[key] or 0) / 2 ** 20 for r in rows
                          if (r["shape"], r["dropout_p"]) == g and r["impl"] == impl), 0) for g in groups]
            ax.bar([i + j * width for i in range(len(groups))], vals, width, label=impl)
        ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(groups))])
        ax.set_xticklabels([f"{s}\np={p}" for s, p in groups], fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    meta = result["metadata"]
    fig.suptitle(f"LoRA linear memory, {meta['device']}, {meta['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser):
    """Memory CLI options."""
    add_common_arguments(parser)
    parser.add_argument("--dropout", type=lambda s: [float(v) for v in s.split(",") if v],
                        default=[0.0, 0.1], help="comma-separated dropout probabilities (default 0,0.1)")


def run_from_args(args) -> dict:
    return run(shapes=args.shapes, device=args.device, dtype=args.dtype, dropouts=args.dropout,
               out=args.out, impls=args.impls)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
