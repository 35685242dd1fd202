"""Memory profile of one training step of any ``nn.Module``: ``profile_memory(model, batch)``.

Saved activations are measured exactly: every tensor autograd packs for backward during the forward
passes through a ``torch.autograd.graph.saved_tensors_hooks`` pack hook and is attributed to the
innermost module whose forward was running at that moment (a module stack kept by per-module
forward pre/post hooks, removed again before ``profile_memory`` returns, also on error).

Accounting rules:
- Bytes are whole storages (``untyped_storage().nbytes()``): a saved view costs what it pins.
- A storage saved several times counts once, for the first module that saved it.
- Storages of the model's parameters and buffers (and of bitsandbytes quantization states hanging
  off its parameters) are not activations: they are held whether or not a graph exists.
- Inputs saved by the first layers (e.g. ``input_ids`` kept by the embedding) count: the graph
  keeps them alive.
- Tensors packed under an inner ``saved_tensors_hooks`` (non-reentrant activation checkpointing,
  CPU offloading hooks) are handled by those hooks and are not seen here.

On CUDA ``profile_memory`` also reports the allocator's peak over the whole step (forward, backward
and, if given, ``optimizer.step()``) and the allocated bytes before it.
"""
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Union

import torch
from torch.multiprocessing.reductions import StorageWeakRef

OUTSIDE = "<outside modules>"  # saved by code running outside every module of the model (the loss sum)


@dataclass
class ModuleMemory:
    """Saved activations attributed to one module. ``name``: qualified name in the profiled model
    ("" is the model itself, ``OUTSIDE`` code outside all its modules); ``module_class``: its class
    name; ``saved_bytes`` / ``saved_count``: unique non-parameter storages it saved."""
    name: str
    module_class: str
    saved_bytes: int = 0
    saved_count: int = 0


@dataclass
class MemoryProfile:
    """Result of ``profile_memory``.

    ``per_module`` lists only modules that saved something, in the order they first saved.
    ``peak_bytes`` / ``baseline_bytes``: CUDA allocator's peak allocated bytes during the step and
    allocated bytes just before it (absolute, whole device; None off CUDA).
    """
    total_saved_bytes: int
    saved_count: int
    per_module: list = field(default_factory=list)
    peak_bytes: Optional[int] = None
    baseline_bytes: Optional[int] = None
    device: str = "cpu"
    loss: Optional[float] = None
    loss_source: str = ""

    @property
    def peak_increase_bytes(self) -> Optional[int]:
        """Peak during the step minus what was allocated before it (None off CUDA)."""
        if self.peak_bytes is None or self.baseline_bytes is None:
            return None
        return self.peak_bytes - self.baseline_bytes

    def grouped(self, key: Callable[[ModuleMemory], str]) -> dict:
        """{key(entry): saved bytes} summed over ``per_module``, in first-seen order of the keys."""
        out = {}
        for m in self.per_module:
            k = key(m)
            out[k] = out.get(k, 0) + m.saved_bytes
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["peak_increase_bytes"] = self.peak_increase_bytes
        return d

    def table(self, top: int = 20) -> str:
        """Text table: totals, then the ``top`` modules by saved bytes (MiB, count, share)."""
        if not isinstance(top, int) or top < 0:
            raise ValueError(f"top must be a non-negative int, got {top!r}")
        mib = 2 ** 20
        lines = [f"saved activations: {self.total_saved_bytes / mib:.3f} MiB in {self.saved_count} storages"
                 f" (device {self.device}, loss from {self.loss_source})"]
        if self.peak_bytes is not None:
            lines.append(f"peak allocated during the step: {self.peak_bytes / mib:.1f} MiB "
                         f"(before: {self.baseline_bytes / mib:.1f} MiB, increase "
                         f"{self.peak_increase_bytes / mib:.1f} MiB)")
        ranked = sorted(self.per_module, key=lambda m: -m.saved_bytes)
        width = max([len(m.name or "(model)") for m in ranked[:top]] + [6])
        lines.append(f"{'module':<{width}}  {'class':<24}{'MiB':>10}{'#':>5}{'share':>8}")
        for m in ranked[:top]:
            share = m.saved_bytes / self.total_saved_bytes if self.total_saved_bytes else 0.0
            lines.append(f"{m.name or '(model)':<{width}}  {m.module_class[:23]:<24}"
                         f"{m.saved_bytes / mib:>10.3f}{m.saved_count:>5d}{share:>8.1%}")
        rest = ranked[top:]
        if rest:
            lines.append(f"... {len(rest)} more modules: {sum(m.saved_bytes for m in rest) / mib:.3f} MiB")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _storage_key(t: torch.Tensor):
    """(key, nbytes, weak reference or None) of the storage behind ``t``. Tensor subclasses without a
    real storage (wrapper subclasses) fall back to the tensor itself."""
    try:
        storage = t.untyped_storage()
        return (str(t.device), storage.data_ptr()), storage.nbytes(), StorageWeakRef(storage)
    except (RuntimeError, NotImplementedError, TypeError):
        return ("tensor", id(t)), t.numel() * t.element_size(), None


class SavedStorages:
    """State of a ``saved_tensors_hooks`` pack hook that counts what autograd saves for backward:
    unique storages (``_storage_key``), skipping parameters and the storage keys in ``persistent``,
    each charged to ``owner()`` at the moment it is packed (e.g. the module running; None by
    default). A key whose storage died and was replaced at the same address counts again.

        saved = SavedStorages(persistent)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            out = forward()
        saved.total_bytes, saved.total_count, saved.by_owner  # {owner: [bytes, count]}, first-save order
    """

    def __init__(self, persistent=frozenset(), owner: Callable[[], object] = lambda: None):
        self.persistent, self.owner = persistent, owner
        self.seen: dict = {}  # storage key -> weak reference (None when the storage cannot be tracked)
        self.by_owner: dict = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.nn.Parameter):
            return t
        key, nbytes, ref = _storage_key(t)
        if key in self.persistent:
            return t
        if key in self.seen and (self.seen[key] is None or not self.seen[key].expired()):
            return t  # same storage already counted
        self.seen[key] = ref
        tally = self.by_owner.setdefault(self.owner(), [0, 0])
        tally[0] += nbytes
        tally[1] += 1
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def total_bytes(self) -> int:
        return sum(b for b, _ in self.by_owner.values())

    @property
    def total_count(self) -> int:
        return sum(c for _, c in self.by_owner.values())


def storage_keys(tensors) -> set:
    """Storage keys (as ``SavedStorages`` compares them) of ``tensors``."""
    return {_storage_key(t)[0] for t in tensors}


def _persistent_keys(model: torch.nn.Module) -> set:
    """Storage keys of what the model holds regardless of the autograd graph: parameters, buffers,
    plain tensor attributes of its modules (caches), and bitsandbytes quantization states (absmax,
    code, nested state) of its parameters and modules."""
    keys = set()

    def add(t):
        if isinstance(t, torch.Tensor):
            keys.add(_storage_key(t)[0])

    def add_quant_state(qs, depth=0):
        if qs is None or depth > 2:
            return
        for value in vars(qs).values() if hasattr(qs, "__dict__") else ():
            if isinstance(value, torch.Tensor):
                add(value)
            elif type(value).__name__ == "QuantState":
                add_quant_state(value, depth + 1)

    for p in model.parameters():
        add(p)
        add_quant_state(getattr(p, "quant_state", None))
    for b in model.buffers():
        add(b)
    for m in model.modules():
        for value in vars(m).values():
            add(value)
        add_quant_state(getattr(m, "quant_state", None))
    return keys


def _device_of(model: torch.nn.Module, batch) -> torch.device:
    tensors = [batch] if isinstance(batch, torch.Tensor) else [v for v in batch.values()
                                                               if isinstance(v, torch.Tensor)]
    tensors += list(model.parameters())
    for t in tensors:
        if t.device.type == "cuda":
            return t.device
    return tensors[0].device if tensors else torch.device("cpu")


def _loss_of(out) -> tuple:
    """(scalar loss tensor, where it came from): ``out.loss`` when present (attribute or key),
    else the sum of the first output (a tensor output, ``out.logits``, ``out[0]``)."""
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    source = "out.loss"
    if loss is None:
        if isinstance(out, torch.Tensor):
            loss, source = out, "sum of the output"
        elif isinstance(out, Mapping) and out.get("logits") is not None:
            loss, source = out["logits"], "sum of out.logits"
        elif isinstance(out, Mapping) and any(v is not None for v in out.values()):
            key = next(k for k, v in out.items() if v is not None)
            loss, source = out[key], f"sum of out[{key!r}]"
        elif isinstance(out, (tuple, list)) and len(out):
            loss, source = out[0], "sum of out[0]"
    if not isinstance(loss, torch.Tensor) or not loss.is_floating_point():
        raise TypeError("the model's output has no floating-point loss, logits or first tensor to "
                        f"backpropagate (got {type(out).__name__})")
    if not loss.requires_grad:
        raise ValueError(f"the loss ({source}) does not require grad: nothing of the model is trainable, "
                         "or it ran under torch.no_grad()")
    if loss.dim() or source != "out.loss":
        # Sum in fp32 without materialising an fp32 copy (sum saves no tensor for backward).
        loss = loss.sum(dtype=torch.float32)
    return loss, source


def _hookable_modules(model: torch.nn.Module) -> list:
    """The modules whose calls the profile follows: all but those inside layers patched by
    patch_peft_model (the base layer, lora_A, lora_B, ...), since a hook on one of them sends its LoRA
    layer to PEFT's path (hooks must run there, and the fast path calls none of them): the profile
    would measure PEFT instead."""
    from lora_kernels.integrations.peft import is_patched

    skip = {id(sub) for m in model.modules() if is_patched(m) for sub in m.modules() if sub is not m}
    return [m for m in model.modules() if id(m) not in skip]


def profile_memory(model: torch.nn.Module, batch: Union[Mapping, torch.Tensor], *,
                   step: Optional[torch.optim.Optimizer] = None) -> MemoryProfile:
    """Runs one training forward + backward of ``model`` on ``batch`` and profiles its memory.

    ``batch``: a dict of keyword arguments (e.g. {"input_ids": [B, T], "labels": [B, T]}) passed
    as ``model(**batch)``, or a tensor passed as ``model(batch)``.
    The loss backpropagated is ``out.loss`` when the output has one (attribute or key, as Hugging
    Face models return with ``labels``); otherwise the sum of the first output: the output itself if
    it is a tensor, else ``out.logits``, else the first non-None value / element.
    ``step``: an optimizer whose ``step()`` runs after the backward, inside the measured step.

    The model's mode is left as it is (call ``model.train()`` first for a training profile).
    Gradients accumulate into ``.grad`` as in any training step (zero them before for a clean
    measurement). The output is dropped before ``step.step()``.
    Returns a ``MemoryProfile``: saved activations per module and in total (see the module
    docstring for the accounting), and on CUDA the peak allocated bytes of the step.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(batch, Mapping):
        bad = [k for k in batch if not isinstance(k, str)]
        if bad:
            raise TypeError(f"batch keys must be argument names (str), got {bad!r}")
    elif not isinstance(batch, torch.Tensor):
        raise TypeError(f"batch must be a dict of model keyword arguments or a tensor, got {type(batch).__name__}")
    if step is not None and not isinstance(step, torch.optim.Optimizer):
        raise TypeError(f"step must be a torch.optim.Optimizer or None, got {type(step).__name__}")

    device = _device_of(model, batch)
    cuda = device.type == "cuda"
    persistent = _persistent_keys(model)
    names = {id(m): name for name, m in model.named_modules()}
    stack: list = []
    saved = SavedStorages(persistent, owner=lambda: stack[-1] if stack else None)

    def push(module, args):
        stack.append(module)

    def pop(module, args, output):
        # always_call=True runs this also when the forward raises, so the stack stays balanced.
        if stack and stack[-1] is module:
            stack.pop()

    handles = []
    baseline = peak = None
    try:
        for m in _hookable_modules(model):
            handles.append(m.register_forward_pre_hook(push))
            handles.append(m.register_forward_hook(pop, always_call=True))
        if cuda:
            torch.cuda.synchronize(device)
            baseline = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            out = model(**batch) if isinstance(batch, Mapping) else model(batch)
            loss, source = _loss_of(out)
        del out
        for h in handles:  # the backward needs no module stack
            h.remove()
        handles.clear()
        loss.backward()
        loss_value = float(loss.detach())
        del loss
        if step is not None:
            step.step()
        if cuda:
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
    finally:
        for h in handles:
            h.remove()
        stack.clear()

    per_module = [ModuleMemory(OUTSIDE if module is None else names[id(module)],
                               "" if module is None else type(module).__name__, nbytes, count)
                  for module, (nbytes, count) in saved.by_owner.items()]
    return MemoryProfile(total_saved_bytes=sum(m.saved_bytes for m in per_module),
                         saved_count=sum(m.saved_count for m in per_module), per_module=per_module,
                         peak_bytes=peak, baseline_bytes=baseline, device=str(device), loss=loss_value,
                         loss_source=source)
