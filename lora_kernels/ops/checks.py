"""Argument checks for the LoRA linear: every error names the argument and what was expected."""
import math
import numbers
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _require_tensor(name: str, t, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _require_shape(name: str, t: torch.Tensor, expected: tuple, meaning: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape {list(expected)} ({meaning}), got {list(t.shape)}")


def _require_real(name: str, value) -> float:
    if type(value) is float and value - value == 0.0:  # a finite Python float (inf - inf and nan give nan)
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    # Comparisons, not math.isfinite: under torch.compile the value may be a symbolic float.
    if value != value or value in (math.inf, -math.inf):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_dropout_p(name: str, value) -> float:
    """A dropout probability as a Python float in [0, 1): TypeError if not a real number (bools
    included), ValueError if outside, both naming the argument."""
    value = _require_real(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def _check_x_shape(x: torch.Tensor, N: int, K: int, weight_name: str) -> None:
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., K], got a 0-d tensor")
    if x.shape[-1] != K:
        raise ValueError(f"x must have last dimension K={K} ({weight_name} is [N, K] = {[N, K]}), "
                         f"got x of shape {list(x.shape)}")


def check_linear_input(x, weight_shape: tuple, weight_device: torch.device, weight_name: str = "weight") -> None:
    """x [..., K] for a base weight [N, K] alone (a merged layer: no adapter in the call): a float32 /
    float16 / bfloat16 tensor of at least one dimension, last dimension K, on the weight's device.
    The same errors as ``check_lora_linear_args`` / ``check_nf4_lora_linear_args`` give for x."""
    _require_tensor("x", x)
    N, K = weight_shape
    _check_x_shape(x, N, K, weight_name)
    if weight_device != x.device:
        raise ValueError(f"{weight_name} must be on x's device {x.device}, got {weight_device}")


def _check_lora_args(x, N: int, K: int, lora_A, lora_B, scale, bias, lora_B_bias, dropout_p, weight_device,
                     weight_name="weight"):
    """Checks shared by the dense and the NF4 layer, for a base weight of shape [N, K]. Messages are
    formatted only on failure: this runs on every call."""
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        _require_tensor(name, t)
    _require_tensor("bias", bias, optional=True)
    _require_tensor("lora_B_bias", lora_B_bias, optional=True)
    scale = _require_real("scale", scale)
    dropout_p = check_dropout_p("dropout_p", dropout_p)

    _check_x_shape(x, N, K, weight_name)
    if lora_A.dim() != 2 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A must have shape [r, K] with K={K}, got {list(lora_A.shape)}")
    r = lora_A.shape[0]
    if r == 0:
        raise ValueError("lora_A must have rank r >= 1 (shape [r, K]), got r = 0")
    _require_shape("lora_B", lora_B, (N, r), f"[N, r] with N={N} from the weight and r={r} from lora_A")
    if bias is not None:
        _require_shape("bias", bias, (N,), "[N]")
    if lora_B_bias is not None:
        _require_shape("lora_B_bias", lora_B_bias, (N,), "[N]")

    # The weight first: when x alone is elsewhere, the message names the weight's device.
    device = x.device
    if weight_device != device:
        raise ValueError(f"{weight_name} must be on x's device {device}, got {weight_device}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias), ("lora_B_bias", lora_B_bias)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} must be on x's device {device}, got {t.device}")
    if lora_A.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"lora_A must have x's dtype {x.dtype} or float32, got {lora_A.dtype}")
    if lora_B.dtype != lora_A.dtype:
        raise ValueError(f"lora_B must have lora_A's dtype {lora_A.dtype}, got {lora_B.dtype}")
    if bias is not None and bias.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"bias must have x's dtype {x.dtype} or float32, got {bias.dtype}")
    if lora_B_bias is not None and lora_B_bias.dtype != lora_B.dtype:
        raise ValueError(f"lora_B_bias must have lora_B's dtype {lora_B.dtype}, got {lora_B_bias.dtype}")
    return scale, dropout_p


def check_lora_linear_args(x, weight, lora_A, lora_B, scale, bias, lora_B_bias, dropout_p):
    """Validate ``lora_linear`` arguments; returns (scale, dropout_p) as Python floats.

    x [..., K], weight [N, K], lora_A [r, K], lora_B [N, r], bias [N], lora_B_bias [N].
    """
    _require_tensor("x", x)
    _require_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {list(weight.shape)}")
    N, K = weight.shape
    scale, dropout_p = _check_lora_args(x, N, K, lora_A, lora_B, scale, bias, lora_B_bias, dropout_p,
                                        weight_device=weight.device)
    if weight.dtype != x.dtype:
        raise ValueError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight must not require grad: the base weight of a LoRA layer is frozen "
                         "(call weight.requires_grad_(False))")
    return scale, dropout_p


def check_nf4_lora_linear_args(x, qweight, lora_A, lora_B, scale, bias, lora_B_bias, dropout_p):
    """Validate ``nf4_lora_linear`` arguments; returns (scale, dropout_p) as Python floats.

    qweight: an ``NF4Weight`` of shape [N, K] on x's device (its dtype may differ from x's: the
    decoded weight is rounded to its own dtype, then cast to x's, as bitsandbytes does).
    """
    from lora_kernels.ops.nf4 import NF4Weight  # same layer; imported here to keep import order simple

    _require_tensor("x", x)
    if not isinstance(qweight, NF4Weight):
        raise TypeError(f"qweight must be a lora_kernels.NF4Weight, got {type(qweight).__name__} "
                        "(convert bitsandbytes weights with lora_kernels.integrations.bitsandbytes.nf4_from_bnb)")
    if len(qweight.shape) != 2:
        raise ValueError(f"qweight must be 2-D [N, K], got shape {list(qweight.shape)}")
    N, K = qweight.shape
    return _check_lora_args(x, N, K, lora_A, lora_B, scale, bias, lora_B_bias, dropout_p,
                            weight_device=qweight.device, weight_name="qweight")


# Set by tools.dry_run while it runs the GPU route on a CPU without a GPU (kernels compiled, launches
# recorded, not run): CPU tensors then take the routes of CUDA ones (``takes_cuda_routes``).
CPU_AS_CUDA = [False]


def takes_cuda_routes(device: torch.device) -> bool:
    """Whether tensors on ``device`` take the CUDA routes: CUDA tensors, and CPU ones in a dry run."""
    return device.type == "cuda" or (CPU_AS_CUDA[0] and device.type == "cpu")


# os.environ keeps its values in the dict os.environ._data, keyed and valued by encoded strings
# (bytes on POSIX); os.environ.get encodes the key, looks it up and decodes the value: ~2 us on this
# CPU, and a layer's forward and backward read 5-10 routing variables. The dict read with a
# pre-encoded key, and the parse cached per raw value, give the same answer for ~0.2 us. Where the
# storage is not that dict (another Python), the public os.environ.get.
_ENV_KEYS: dict = {}  # name -> its key in os.environ._data
_ENV_INTS: dict = {}  # (name, default) -> (raw value last read, its int)


def env_text(name: str, default: str = "") -> str:
    """``os.environ.get(name, default)``, read per call at a fraction of its cost (see above)."""
    data = getattr(os.environ, "_data", None)
    if type(data) is not dict:
        return os.environ.get(name, default)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.environ.encodekey(name)
    raw = data.get(key)
    return default if raw is None else os.environ.decodevalue(raw)


def env_nonnegative_int(name: str, default: int) -> int:
    """The environment variable ``name`` as an int >= 0 (read per call, so tuning runs can change it),
    or ``default`` when unset or empty. ValueError naming the variable otherwise."""
    raw = env_text(name)
    cached = _ENV_INTS.get((name, default))
    if cached is not None and cached[0] == raw:
        return cached[1]
    text = raw.strip()
    if not text:
        value = default
    else:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {text!r}")
    _ENV_INTS[(name, default)] = (raw, value)
    return value
