"""The NF4 (QLoRA 4-bit NormalFloat) weight format, byte-compatible with bitsandbytes 0.50; also its
FP4 format (``quant_type="fp4"``, the default of transformers' BitsAndBytesConfig), which differs only
in the 16-entry code table.

Pure PyTorch, no bitsandbytes import (bnb objects are converted in ``lora_kernels.integrations``).

Layout of a weight of ``numel`` elements (any shape, flattened row-major):
  - blocks of ``blocksize`` consecutive elements (blocks span rows; the last one may be partial),
    each scaled by its fp32 absmax; ``n_blocks = ceil(numel / blocksize)``;
  - a 4-bit index into the 16-entry NF4 (or FP4) table per element, two per byte, the first element
    of a pair in the HIGH nibble: ``packed`` is uint8 [(numel + 1) // 2, 1]; for odd numel the last
    low nibble holds the padding code (the code bnb's quantizer gives 0.0: 7 in NF4, 0 in FP4);
  - double quantization (bnb ``compress_statistics``): ``offset = mean(absmax)``, and
    ``absmax - offset`` quantized to uint8 with bnb's signed dynamic 8-bit map in blocks of
    ``nested_blocksize`` (256), with one fp32 scale per nested block.

Decoding: ``w = NF4[q] * absmax_f32`` (FP4[q] for FP4) in fp32, then one cast to ``dtype``; with double quant
``absmax_f32 = fl(dynamic[qa] * scale[i // 256]) + offset`` (two fp32 roundings, no FMA).

Quantization reproduces bitsandbytes' CPU path bit for bit (see ``NF4Weight.quantize``); on other
devices the same torch arithmetic runs there. An empty weight (numel 0) is supported: bnb produces
empty packed/absmax tensors and, with double quant, ``offset = mean([]) = NaN``; so do we.
"""
import json
import math
import operator
import weakref
from typing import NamedTuple, Optional, Sequence, Union

import torch

# get_4bit_type("nf4") of bitsandbytes: quantiles of N(0, 1) normalised to [-1, 1]. Each literal is
# the exact double value of the fp32 entry, so torch.tensor(NF4_CODE) reproduces the table bitwise.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# bitsandbytes' FP4 (get_4bit_type("fp4"): sign bit, then 2 exponent and 1 mantissa bits; the values
# {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12 as fp32, exact literals as above). Code 8 is -0.0: bnb's CUDA
# dequantize kernel decodes it so (dDequantizeFP4Tree: sign * table), and its native CPU kernel on
# some CPUs, although its quant_map tensor holds +0.0 there (as its CPU kernel on others decodes it).
FP4_CODE = (
    0.0,
    0.0052083334885537624,
    0.6666666865348816,
    1.0,
    0.3333333432674408,
    0.5,
    0.1666666716337204,
    0.25,
    -0.0,
    -0.0052083334885537624,
    -0.6666666865348816,
    -1.0,
    -0.3333333432674408,
    -0.5,
    -0.1666666716337204,
    -0.25,
)
# bnb's CPU quantizer (backends/default/ops.py) sorts the table (torch.argsort: the zeros of codes 0
# and 8 in that order), buckets each scaled value by the midpoints of neighbours, and maps the bucket
# back to its code; so a value in (0, 0.0026] gets code 8. NF4's table is sorted already.
_FP4_SORT_ORDER = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)

SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bnb quantize_4bit / dequantize_4bit
NESTED_BLOCKSIZE = 256  # bnb quantize_4bit always double-quantizes absmax in blocks of 256
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NAMED_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_QUANT_STATE_KEY = "quant_state.bitsandbytes__"
QUANT_TYPES = ("nf4", "fp4")
# bnb's CPU 8-bit quantizer discretises [-1, 1] into this many points and maps each to a code.
_LUT_SIZE = 65536

_device_tables: dict = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    """Per-device cache of the constant tables (built on first use, never at import time)."""
    device = torch.device(device)
    key = (name, device)
    if key not in _device_tables:
        _device_tables[key] = _TABLE_BUILDERS[name](device)
    return _device_tables[key]


def _build_nf4(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def _build_fp4(device: torch.device) -> torch.Tensor:
    return torch.tensor(FP4_CODE, dtype=torch.float32, device=device)


def _build_fp4_order(device: torch.device) -> torch.Tensor:
    return torch.tensor(_FP4_SORT_ORDER, dtype=torch.int32, device=device)


def _bounds(quant_type: str, device: torch.device) -> torch.Tensor:
    # Decision boundaries between neighbouring values of the sorted table, rounded to fp32 like bnb's
    # _get_4bit_quantize_bounds: (sorted[i] + sorted[i+1]) / 2 (the halving is exact).
    code = _table(quant_type, device)
    if quant_type == "fp4":
        code = code[_table("fp4_order", device).long()]
    return (code[:-1] + code[1:]) / 2


def _build_dynamic(device: torch.device) -> torch.Tensor:
    # bnb create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for exponent i the
    # fraction bins are the midpoints of an fp32 linspace(0.1, 1, 2**i + 1), times +-10**(i - 6)
    # as an fp32 tensor-by-scalar product; plus 0 and 1, sorted. With these arguments bnb's
    # "additional items" term is empty and the list has exactly 256 values.
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32, device="cpu")  # (not a default device's)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (i - 6)
        values += (scale * means).tolist() + (-scale * means).tolist()
    values.sort()
    return torch.tensor(values, dtype=torch.float32, device=device)


def _build_dynamic_lut(device: torch.device) -> torch.Tensor:
    # bnb's CPU quantize_blockwise (build_quantize_lut in csrc/cpu_ops.cpp): LUT entry j holds the
    # number of fp32 code midpoints 0.5f * (c[k] + c[k+1]) strictly below v_j = 2j / 65535 - 1
    # (fp32 arithmetic), i.e. the code of the nearest midpoint-bucket, ties to the lower code.
    # Built on the CPU, whose division is IEEE, like bnb's, and then copied.
    code = _table("dynamic", torch.device("cpu"))
    midpoints = (code[:-1] + code[1:]) * 0.5
    grid = torch.arange(_LUT_SIZE, dtype=torch.float32, device="cpu") * 2 / (_LUT_SIZE - 1) - 1
    return torch.searchsorted(midpoints, grid).to(device=device, dtype=torch.uint8)


_TABLE_BUILDERS = {"nf4": _build_nf4, "fp4": _build_fp4, "fp4_order": _build_fp4_order,
                   "nf4_bounds": lambda device: _bounds("nf4", device),
                   "fp4_bounds": lambda device: _bounds("fp4", device),
                   "dynamic": _build_dynamic, "dynamic_lut": _build_dynamic_lut}


def dynamic_map(device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """bnb's signed dynamic 8-bit map (``create_dynamic_map()``), bitwise: fp32 [256], a fresh copy."""
    return _table("dynamic", device).clone()


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple:
    """Zero-pad fp32 ``flat`` [n] to whole blocks: (blocks [n_blocks, blocksize], absmax [n_blocks])."""
    n_blocks = -(-flat.numel() // blocksize)
    blocks = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - flat.numel())).view(n_blocks, blocksize)
    return blocks, blocks.abs().amax(dim=1)


def _quantize_4bit_codes(flat: torch.Tensor, blocksize: int, quant_type: str) -> tuple:
    """4-bit codes (int32 [n + n % 2]: an odd n gets the code of 0.0 as padding) and fp32 absmax
    [n_blocks] of fp32 ``flat`` [n], as bnb's CPU path.

    bnb 0.50 has no native CPU 4-bit quantizer: torch.ops.bitsandbytes.quantize_4bit runs its
    "default" torch kernel (backends/default/ops.py), whose arithmetic is reproduced here:
      - whole blocks: ``x * (1.0 / absmax.clamp(min=1e-38))``; an all-zero block keeps absmax 0
        (its values scale to 0 -> code 7);
      - the partial last block: ``x / absmax`` (a true division, not the reciprocal product), and
        its STORED absmax is the clamped one (1e-38 when the block is all zeros);
      - clamp to [-1, 1], pad an odd count with 0.0, then ``bucketize`` on the fp32 midpoints of the
        sorted table (a value exactly on a midpoint takes the lower one), mapped back to FP4's codes.
    """
    n = flat.numel()
    full = n - n % blocksize
    scaled_parts, absmax_parts = [], []
    if full:
        whole = flat[:full].view(-1, blocksize)
        absmax = whole.abs().amax(dim=1)
        scaled_parts.append((whole * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1))
        absmax_parts.append(absmax)
    if full < n:
        tail = flat[full:]
        tail_absmax = tail.abs().max().clamp(min=1e-38)
        scaled_parts.append(tail / tail_absmax)
        absmax_parts.append(tail_absmax.reshape(1))
    if not scaled_parts:
        return (torch.empty(0, dtype=torch.int32, device=flat.device),
                torch.empty(0, dtype=torch.float32, device=flat.device))
    scaled = torch.cat(scaled_parts).clamp(-1, 1)
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    codes = torch.bucketize(scaled, _table(f"{quant_type}_bounds", flat.device), out_int32=True)
    if quant_type == "fp4":
        codes = _table("fp4_order", flat.device)[codes.long()]
    return codes, torch.cat(absmax_parts)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int codes [n] in [0, 16), n even -> uint8 [n // 2, 1], first of each pair in the high nibble."""
    codes = codes.to(torch.uint8).view(-1, 2)
    return ((codes[:, 0] << 4) | codes[:, 1]).unsqueeze(1)


def _unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 [(numel + 1) // 2, 1] -> int64 codes [numel]."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    return codes[:numel].long()


def _quantize_absmax(centered: torch.Tensor, blocksize: int) -> tuple:
    """uint8 codes [n] and fp32 scales [ceil(n / blocksize)] of fp32 ``centered`` [n] (= absmax - offset).

    Reproduces bnb's native CPU ``quantize_blockwise`` (cquantize_blockwise_cpu_fp32 ->
    quantize_cpu_impl<float> in libbitsandbytes_cpu.so, checked against its disassembly):
      - scale = max|x| over the block; an all-zero block gets code 0 everywhere (not the code of 0);
      - y = clamp(x * fl(1.0f / scale), -1, 1), t = fl(fl(y + 1) * 0.5);
      - j = trunc(fma(t, 65535, 0.5)) indexes the 65536-entry LUT of ``_build_dynamic_lut``. The
        compiled kernel uses a fused multiply-add; for every t it can see (the fp32 multiples of
        2**-25 in [0, 1], checked exhaustively) the unfused fp32 ``t * 65535 + 0.5`` truncates to
        the same index, so plain fp32 torch ops reproduce it on any device.
    The LUT, not the exact nearest code, decides: inputs within ~1.5e-5 of 0 map to codes 123 or 131.
    """
    blocks, scales = _blockwise_absmax(centered, blocksize)
    zero_block = scales == 0
    safe = torch.where(zero_block, torch.ones_like(scales), scales)
    inv = torch.ones_like(safe) / safe
    # A subnormal scale has an infinite inverse: x * inf saturates to +-1 below, as in bnb, and 0 * inf
    # (NaN, an index out of range in bnb's kernel too) is taken as 0.
    scaled = (blocks * inv[:, None]).nan_to_num(nan=0.0)
    t = (scaled.clamp(-1, 1) + 1) * 0.5
    lut_index = (t * (_LUT_SIZE - 1) + 0.5).long()  # truncation (the value is positive)
    codes = _table("dynamic_lut", centered.device)[lut_index]
    codes = codes.masked_fill(zero_block[:, None], 0)
    return codes.reshape(-1)[:centered.numel()], scales


def _check_tensor(name: str, value, dtypes: Sequence[torch.dtype], shape: Optional[tuple] = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        expected = " or ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} must have dtype {expected}, got {value.dtype}")
    if shape is not None and tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(value.shape)}")
    return value.contiguous()


def _check_shape(shape) -> tuple:
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise TypeError(f"shape must be a sequence of ints, got {type(shape).__name__}")
    if len(shape) == 0:
        raise ValueError("shape must have at least one dimension, got ()")
    out = []
    for size in shape:
        try:
            if isinstance(size, bool):
                raise TypeError
            size = operator.index(size)  # ints and integer scalars (numpy, 0-d integer tensors)
        except TypeError:
            raise TypeError(f"shape entries must be ints, got {tuple(shape)!r}") from None
        if size < 0:
            raise ValueError(f"shape entries must be >= 0, got {tuple(shape)}")
        out.append(size)
    return tuple(out)


def _check_blocksize(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"{name} must be one of {SUPPORTED_BLOCKSIZES} (bitsandbytes' 4-bit block sizes), "
                         f"got {value}")
    return value


def _check_quant_type(quant_type) -> str:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unsupported quant type {quant_type!r}: 'nf4' or 'fp4' expected")
    return quant_type


def _code_quant_type(code: torch.Tensor, quant_type: Optional[str]) -> str:
    """The quant type whose table ``code`` holds (``quant_type`` itself when given: then ``code`` must be
    its table). Equality ignores the sign of zero (bnb's FP4 quant_map has +0.0 at code 8)."""
    for name in (quant_type,) if quant_type else QUANT_TYPES:
        if torch.equal(code, _table(name, code.device)):
            return name
    wanted = f"the {quant_type.upper()} table" if quant_type else "the NF4 or the FP4 table"
    raise ValueError(f"code must be {wanted} (NF4_CODE / FP4_CODE); got different values "
                     "(a quant_map of another 4-bit type?)")


# The quant type of each code tensor an NF4Weight has checked, so that decoders which need it as a
# host value (bitsandbytes' kernels: "nf4" or "fp4") know it without reading a device tensor (a host
# sync on every call): id(code) -> (weak reference to it, its version counter then, quant type).
_CHECKED_CODES: dict = {}


def _remember_checked_code(code: torch.Tensor, quant_type: str) -> None:
    if code.is_inference():
        return  # no version counter: an in-place write would go unseen (then the decoders read the table)
    key = id(code)

    def forget(ref, key=key):
        if _CHECKED_CODES.get(key, (None,))[0] is ref:
            del _CHECKED_CODES[key]
    _CHECKED_CODES[key] = (weakref.ref(code, forget), tensor_version(code), quant_type)


def tensor_version(t: torch.Tensor) -> Optional[int]:
    """t's version counter (bumped by in-place writes through t or its views, not through ``t.data``),
    or None for an inference tensor (made under torch.inference_mode), which has none."""
    return None if t.is_inference() else t._version


def checked_quant_type(code: torch.Tensor) -> Optional[str]:
    """"nf4" or "fp4" when ``code`` (this very tensor, not written in place since) is the code table of
    an NF4Weight built eagerly, which checked its values; else None (a copy, a traced weight)."""
    entry = _CHECKED_CODES.get(id(code))
    if entry is None or entry[0]() is not code or entry[1] != tensor_version(code):
        return None
    return entry[2]


def _check_dtype(name: str, dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype, got {type(dtype).__name__}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be one of {SUPPORTED_DTYPES}, got {dtype}")
    return dtype


class NF4Weight:
    """An NF4-quantized weight (or FP4: ``quant_type``); tensor fields as bitsandbytes stores them (see
    the module docstring).

    Fields (read by the Triton kernels; treat as immutable):
        packed: uint8 [(numel + 1) // 2, 1], two codes per byte, first element in the high nibble.
        absmax: [n_blocks], fp32, or uint8 when double-quantized.
        absmax_code: fp32 [256] dynamic map (bnb nested quant_map), or None.
        absmax_scale: fp32 [ceil(n_blocks / nested_blocksize)] (bnb state2.absmax), or None.
        absmax_offset: fp32 0-d (bnb offset), or None.
        code: fp32 [16], the NF4 or FP4 table (bnb quant_map); for FP4 always ``FP4_CODE`` itself (code 8
            decodes to -0.0, as in bnb's kernels): a given table equal to it but for that sign is replaced.
        shape: tuple of ints; dtype: dtype of the dequantized weight (bnb quant_state.dtype).
        quant_type: "nf4" or "fp4"; when not given, the type whose table ``code`` is ("nf4" without a code,
            and for a traced or meta weight, whose values cannot be read).
        blocksize: one of SUPPORTED_BLOCKSIZES; nested_blocksize: positive int (256 from quantize).
    """

    __slots__ = ("packed", "absmax", "absmax_code", "absmax_scale", "absmax_offset", "code", "shape", "dtype",
                 "blocksize", "nested_blocksize", "quant_type")

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape: Sequence[int], dtype: torch.dtype,
                 blocksize: int = 64, *, code: Optional[torch.Tensor] = None,
                 absmax_code: Optional[torch.Tensor] = None, absmax_scale: Optional[torch.Tensor] = None,
                 absmax_offset: Optional[torch.Tensor] = None, nested_blocksize: int = NESTED_BLOCKSIZE,
                 quant_type: Optional[str] = None):
        if quant_type is not None:
            _check_quant_type(quant_type)
        shape = _check_shape(shape)
        dtype = _check_dtype("dtype", dtype)
        blocksize = _check_blocksize("blocksize", blocksize)
        numel = math.prod(shape)
        n_blocks = -(-numel // blocksize)

        if isinstance(packed, torch.Tensor) and packed.dim() == 1:
            packed = packed.view(-1, 1)  # accept the flat layout; the data is the same
        packed = _check_tensor("packed", packed, (torch.uint8,), ((numel + 1) // 2, 1))
        absmax = _check_tensor("absmax", absmax, (torch.float32, torch.uint8), (n_blocks,))
        device = packed.device
        if code is None:
            code = _table(quant_type or "nf4", device).clone()
        code = _check_tensor("code", code, (torch.float32,), (16,))

        nested = {"absmax_code": absmax_code, "absmax_scale": absmax_scale, "absmax_offset": absmax_offset}
        if absmax.dtype == torch.uint8:
            missing = [name for name, value in nested.items() if value is None]
            if missing:
                raise ValueError(f"absmax is uint8 (double-quantized) but {', '.join(missing)} "
                                 f"{'is' if len(missing) == 1 else 'are'} None")
            if isinstance(nested_blocksize, bool) or not isinstance(nested_blocksize, int):
                raise TypeError(f"nested_blocksize must be an int, got {type(nested_blocksize).__name__}")
            if nested_blocksize <= 0:
                raise ValueError(f"nested_blocksize must be positive, got {nested_blocksize}")
            absmax_code = _check_tensor("absmax_code", absmax_code, (torch.float32,), (256,))
            absmax_scale = _check_tensor("absmax_scale", absmax_scale, (torch.float32,),
                                         (-(-n_blocks // nested_blocksize),))
            if isinstance(absmax_offset, torch.Tensor) and absmax_offset.numel() == 1:
                absmax_offset = absmax_offset.reshape(())  # bnb stores a 0-d tensor; accept [1] too
            absmax_offset = _check_tensor("absmax_offset", absmax_offset, (torch.float32,), ())
        else:
            given = [name for name, value in nested.items() if value is not None]
            if given:
                raise ValueError(f"absmax is float32 (not double-quantized) but {', '.join(given)} "
                                 f"{'was' if len(given) == 1 else 'were'} given")
            nested_blocksize = NESTED_BLOCKSIZE

        tensors = {"packed": packed, "absmax": absmax, "code": code, "absmax_code": absmax_code,
                   "absmax_scale": absmax_scale, "absmax_offset": absmax_offset}
        others = {name: t.device for name, t in tensors.items() if t is not None and t.device != device}
        if others:
            raise ValueError(f"all tensors must be on one device: packed is on {device}, "
                             + ", ".join(f"{name} on {dev}" for name, dev in others.items()))
        # Traced (torch.export / torch.compile rebuild the layer's NF4Weight from fake buffers), the
        # values are unknown: the check ran when the weight was built eagerly.
        traced = torch.compiler.is_compiling()
        if device.type != "meta" and not traced:
            quant_type = _code_quant_type(code, quant_type)
            if quant_type == "fp4" and not torch.equal(code.view(torch.int32), _table("fp4", device).view(torch.int32)):
                code = _table("fp4", device).clone()  # the sign of code 8's zero, as bnb's kernels decode it
            _remember_checked_code(code, quant_type)
        quant_type = quant_type or "nf4"

        self.packed, self.absmax, self.code, self.quant_type = packed, absmax, code, quant_type
        self.absmax_code, self.absmax_scale, self.absmax_offset = absmax_code, absmax_scale, absmax_offset
        self.shape, self.dtype, self.blocksize, self.nested_blocksize = shape, dtype, blocksize, nested_blocksize

    def __setstate__(self, state) -> None:
        # copy.deepcopy and pickle restore the fields without __init__. The copy's table is checked
        # again (it may have been written in place since this weight checked it: one 16-value
        # comparison per copy) and its quant type remembered (checked_quant_type); a table that no
        # longer holds it is not remembered (the decoders then read the table itself).
        _, fields = state
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        code = fields.get("code")
        if type(code) is torch.Tensor and code.device.type != "meta":
            try:
                _remember_checked_code(code, _code_quant_type(code, self.quant_type))
            except ValueError:
                pass

    # ---- derived properties -------------------------------------------------------------------

    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == torch.uint8

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def op_tensors(self) -> tuple:
        """(packed, absmax, absmax_code, absmax_scale, absmax_offset, code): the tensor arguments of the
        ``lora_kernels::nf4_*`` custom ops, in their order; the three double-quantization tables are
        None without double quantization."""
        dq = self.double_quant
        return (self.packed, self.absmax, self.absmax_code if dq else None, self.absmax_scale if dq else None,
                self.absmax_offset if dq else None, self.code)

    def _tensors(self) -> list:
        return [t for t in (getattr(self, name) for name in self.TENSOR_FIELDS) if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors, the constant code tables included."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    @property
    def bits_per_parameter(self) -> float:
        """8 * nbytes / numel (NaN for an empty weight); about 4.127 with double quant, 4.5 without."""
        return 8 * self.nbytes / self.numel if self.numel else math.nan

    # ---- quantize / dequantize ------------------------------------------------------------------

    @classmethod
    def quantize(cls, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 quant_type: str = "nf4", nested_blocksize: Optional[int] = None) -> "NF4Weight":
        """Quantize ``weight`` (fp32/fp16/bf16, any shape with ndim >= 1) on its own device.

        Bytes and scales are identical to ``bitsandbytes.functional.quantize_4bit(weight,
        blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)`` on CPU.
        nested_blocksize: absmax values per second-level block when double-quantized; None is
        quantize_4bit's 256 (its only choice; another is bnb's ``quantize_blockwise`` of
        absmax - mean(absmax) at that block size, which a QuantState or state dict may carry).
        (bnb's CUDA quantizer rounds a few values differently, e.g. FP4 near its decision boundaries:
        its thresholds are other fp32 constants.) Raises ValueError for non-finite values (bnb would
        silently produce garbage scales).
        """
        _check_quant_type(quant_type)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        dtype = _check_dtype("weight.dtype", weight.dtype)
        blocksize = _check_blocksize("blocksize", blocksize)
        if nested_blocksize is None:
            nested_blocksize = NESTED_BLOCKSIZE
        elif isinstance(nested_blocksize, bool) or not isinstance(nested_blocksize, int):
            raise TypeError(f"nested_blocksize must be None or an int, got {type(nested_blocksize).__name__}")
        elif nested_blocksize <= 0:
            raise ValueError(f"nested_blocksize must be positive, got {nested_blocksize}")
        if weight.dim() == 0:
            raise ValueError("weight must have at least one dimension, got a 0-d tensor")
        flat = weight.detach().reshape(-1).float()
        if flat.device.type != "meta" and not bool(torch.isfinite(flat).all()):
            raise ValueError("weight contains NaN or Inf; NF4 quantization needs finite values")
        codes, absmax = _quantize_4bit_codes(flat, blocksize, quant_type)
        packed = _pack_nibbles(codes)
        if not double_quant:
            return cls(packed, absmax, tuple(weight.shape), dtype, blocksize, quant_type=quant_type)
        # bnb: offset = absmax.mean(); quantize_blockwise(absmax - offset, blocksize=256 or the one asked).
        offset = absmax.mean()
        if offset.device.type != "meta" and bool(torch.isinf(offset)):  # (NaN: no blocks at all)
            # bnb goes on and stores NaN scales: every decoded value would be NaN
            raise ValueError("weight is too large for double quantization: the mean of its block absmax values "
                             f"overflows float32 ({float(offset)}); use double_quant=False")
        qabsmax, scales = _quantize_absmax(absmax - offset, nested_blocksize)
        return cls(packed, qabsmax, tuple(weight.shape), dtype, blocksize,
                   absmax_code=_table("dynamic", flat.device).clone(), absmax_scale=scales,
                   absmax_offset=offset, nested_blocksize=nested_blocksize, quant_type=quant_type)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight [*shape] in ``self.dtype`` (then cast to ``dtype`` if given); see dequantize_nf4_reference.

        CUDA weights are decoded by the Triton kernel (``lora_kernels::nf4_dequantize``, bit-exact
        with the reference); CPU weights by the reference itself."""
        if self.device.type == "cuda":
            # Same layer; imported here because nf4_lora_linear's checks import this module.
            from lora_kernels.ops.nf4_lora_linear import nf4_dequantize
            out = nf4_dequantize(*self.op_tensors(), self.numel, self.blocksize, self.nested_blocksize,
                                 self.dtype).view(self.shape)
            return out if dtype is None or dtype == self.dtype else out.to(dtype)
        return dequantize_nf4_reference(self, dtype)

    # ---- conversions ------------------------------------------------------------------------------

    TENSOR_FIELDS = ("packed", "absmax", "code", "absmax_code", "absmax_scale", "absmax_offset")

    def replace_tensors(self, **tensors) -> "NF4Weight":
        """A weight of the same format (shape, dtype, block sizes, quant type) with the given tensor
        fields (names from ``TENSOR_FIELDS``; e.g. a module's buffers) and this one's other tensors;
        validated like any new NF4Weight."""
        fields = {name: getattr(self, name) for name in self.TENSOR_FIELDS}
        fields.update(tensors)
        packed, absmax = fields.pop("packed"), fields.pop("absmax")
        return NF4Weight(packed, absmax, self.shape, self.dtype, self.blocksize, nested_blocksize=self.nested_blocksize,
                         quant_type=self.quant_type, **fields)

    def constant_table(self, name: str, device) -> torch.Tensor:
        """A new copy, on ``device``, of the value a table field always holds: ``code`` the 4-bit
        type's 16 values, ``absmax_code`` the dynamic map (e.g. to rebuild them after to_empty())."""
        tables = {"code": self.quant_type, "absmax_code": "dynamic"}
        if name not in tables:
            raise ValueError(f"name must be one of {sorted(tables)}, got {name!r}")
        return _table(tables[name], device).clone()

    def map_tensors(self, fn) -> "NF4Weight":
        """``replace_tensors`` with ``fn(name, tensor)`` for each tensor field that is not None (moved,
        copied)."""
        return self.replace_tensors(**{name: fn(name, getattr(self, name)) for name in self.TENSOR_FIELDS
                                       if getattr(self, name) is not None})

    def to(self, device: Union[str, torch.device]) -> "NF4Weight":
        """A copy on ``device`` (shares tensors when already there)."""
        return self.map_tensors(lambda name, t: t.to(device))

    def __repr__(self) -> str:
        return (f"NF4Weight(quant_type={self.quant_type!r}, shape={self.shape}, dtype={self.dtype}, "
                f"blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, device={self.device}, "
                f"bits_per_parameter={self.bits_per_parameter:.3f})")

    def _quant_state_json(self) -> dict:
        # Same fields, order and value formats as bnb QuantState.as_dict(packed=True): the dtype
        # as its name without "torch.", the shape as a list, the offset as a Python float.
        fields = {"quant_type": self.quant_type, "blocksize": self.blocksize, "dtype": _DTYPE_NAMES[self.dtype],
                  "shape": list(self.shape)}
        if self.double_quant:
            fields.update({"nested_blocksize": self.nested_blocksize, "nested_dtype": "float32",
                           # a meta weight has no value: 0.0 stands in (state_dict puts the blob on meta)
                           "nested_offset": 0.0 if self.absmax_offset.is_meta else self.absmax_offset.item()})
        return fields

    def state_dict(self, prefix: str = "weight") -> dict:
        """Tensors under bnb Linear4bit's state_dict keys (``prefix``, ``prefix.absmax``, ...).

        ``prefix.quant_state.bitsandbytes__nf4`` (``__fp4``) is a CPU uint8 tensor of the UTF-8 JSON that bnb
        writes. The tensors are shared with this object, except ``nested_quant_map``, which bnb
        clones too (so safetensors does not see one storage under several names).
        """
        out = {prefix: self.packed, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.code}
        if self.double_quant:
            out[f"{prefix}.nested_absmax"] = self.absmax_scale
            out[f"{prefix}.nested_quant_map"] = self.absmax_code.clone()
        blob = json.dumps(self._quant_state_json()).encode("utf-8")
        out[f"{prefix}.{_QUANT_STATE_KEY}{self.quant_type}"] = torch.tensor(
            list(blob), dtype=torch.uint8, device="meta" if self.packed.is_meta else "cpu")
        return out

    @classmethod
    def from_state_dict(cls, state_dict: dict, prefix: str = "weight") -> "NF4Weight":
        """Inverse of ``state_dict``; reads a bnb Linear4bit state_dict (other keys are ignored).

        The packed weight may be stored in another dtype (bnb quant_storage); it is viewed as uint8.
        Raises ValueError naming a missing key or an unexpected value.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        blob_keys = [k for k in state_dict if isinstance(k, str) and k.startswith(f"{prefix}.{_QUANT_STATE_KEY}")]
        if not blob_keys:
            raise ValueError(f"state_dict is missing key {f'{prefix}.{_QUANT_STATE_KEY}nf4'!r} (or its __fp4 twin)")
        if len(blob_keys) > 1:
            raise ValueError(f"state_dict has several quant states for {prefix!r}: {blob_keys}")
        blob_key = blob_keys[0]
        key_type = _check_quant_type(blob_key[len(f"{prefix}.{_QUANT_STATE_KEY}"):])

        def get(key: str) -> torch.Tensor:
            if key not in state_dict:
                raise ValueError(f"state_dict is missing key {key!r}")
            value = state_dict[key]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state_dict[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
            return value

        blob = get(blob_key)
        try:
            fields = json.loads(bytes(blob.detach().cpu().to(torch.uint8).numpy()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"state_dict[{blob_key!r}] is not UTF-8 JSON: {exc}") from None
        if not isinstance(fields, dict):
            raise ValueError(f"state_dict[{blob_key!r}] must hold a JSON object, got {fields!r}")

        def field(name: str):
            if name not in fields:
                raise ValueError(f"state_dict[{blob_key!r}] is missing field {name!r}")
            return fields[name]

        if field("quant_type") != key_type:
            raise ValueError(f"state_dict[{blob_key!r}] field 'quant_type' is {fields['quant_type']!r}, its key "
                             f"says {key_type!r}")
        dtype_name = field("dtype")
        if dtype_name not in _NAMED_DTYPES:
            raise ValueError(f"state_dict[{blob_key!r}] field 'dtype' must be one of {sorted(_NAMED_DTYPES)}, "
                             f"got {dtype_name!r}")
        shape = field("shape")
        if not isinstance(shape, list):
            raise ValueError(f"state_dict[{blob_key!r}] field 'shape' must be a list, got {shape!r}")
        packed = _as_uint8(get(prefix), f"state_dict[{prefix!r}]")
        absmax = get(f"{prefix}.absmax")
        nested = {}
        if "nested_offset" in fields or f"{prefix}.nested_absmax" in state_dict:
            if field("nested_dtype") != "float32":
                raise ValueError(f"state_dict[{blob_key!r}] field 'nested_dtype' must be 'float32', "
                                 f"got {fields['nested_dtype']!r}")
            offset = field("nested_offset")
            if isinstance(offset, bool) or not isinstance(offset, (int, float)):
                raise ValueError(f"state_dict[{blob_key!r}] field 'nested_offset' must be a number, got {offset!r}")
            nested = {"absmax_scale": get(f"{prefix}.nested_absmax"),
                      "absmax_code": get(f"{prefix}.nested_quant_map"),
                      "absmax_offset": torch.tensor(float(offset), dtype=torch.float32, device=absmax.device),
                      "nested_blocksize": field("nested_blocksize")}
        return cls(packed, absmax, shape, _NAMED_DTYPES[dtype_name], field("blocksize"),
                   code=get(f"{prefix}.quant_map"), quant_type=key_type, **nested)

    @classmethod
    def from_quant_state(cls, packed: torch.Tensor, quant_state) -> "NF4Weight":
        """Wrap bnb's packed weight and ``QuantState`` (read by duck typing) without copying.

        ``packed`` may be stored in another dtype (bnb quant_storage, e.g. bf16): it is viewed as
        uint8. The NF4Weight shares every tensor with the QuantState (but an FP4 quant_map: see ``code``).
        """
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
        for attr in ("absmax", "code", "blocksize", "dtype", "shape", "quant_type"):
            if not hasattr(quant_state, attr):
                raise TypeError(f"quant_state must look like a bitsandbytes QuantState (attribute {attr!r} "
                                f"missing), got {type(quant_state).__name__}")
        _check_quant_type(quant_state.quant_type)
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise ValueError("quant_state uses bitsandbytes' CPU inference packing (packing_format_for_cpu): the "
                             "bytes are reordered and absmax is rounded to bf16, so the original NF4 data is lost. "
                             "Read the weight before running the Linear4bit in eval mode on CPU.")
        if quant_state.shape is None:
            raise ValueError("quant_state.shape is None")
        state2 = getattr(quant_state, "state2", None)
        nested = {}
        if state2 is not None:
            nested = {"absmax_code": state2.code, "absmax_scale": state2.absmax,
                      "absmax_offset": getattr(quant_state, "offset", None), "nested_blocksize": state2.blocksize}
        return cls(_as_uint8(packed, "packed"), quant_state.absmax, tuple(quant_state.shape), quant_state.dtype,
                   quant_state.blocksize, code=quant_state.code, quant_type=quant_state.quant_type, **nested)


class NF4Tensors(NamedTuple):
    """The device tensors of a bitsandbytes NF4 weight of shape [N, K] (layout in the module docstring),
    as the launchers and the torch.library ops take them.

    packed uint8 [(N*K + 1) // 2, 1]; absmax fp32 [n_blocks] or uint8 (double quant, then
    absmax_code fp32 [256], absmax_scale fp32 [ceil(n_blocks / nested_blocksize)], absmax_offset fp32
    0-d); code fp32 [16]; dtype: the stored (dequantized) dtype.
    """
    packed: torch.Tensor
    absmax: torch.Tensor
    absmax_code: Optional[torch.Tensor]
    absmax_scale: Optional[torch.Tensor]
    absmax_offset: Optional[torch.Tensor]
    code: torch.Tensor
    N: int
    K: int
    blocksize: int
    nested_blocksize: int
    dtype: torch.dtype

    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == torch.uint8

    @classmethod
    def of(cls, weight) -> "NF4Tensors":
        """The tensors of an ``NF4Weight`` [N, K]."""
        N, K = weight.shape
        return cls(*weight.op_tensors(), N, K, weight.blocksize, weight.nested_blocksize, weight.dtype)


def _as_uint8(packed: torch.Tensor, name: str) -> torch.Tensor:
    """View a packed weight stored in any dtype as uint8 [bytes, 1] (no copy when contiguous)."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
    packed = packed.detach()
    if packed.dtype == torch.uint8:
        return packed
    if packed.dtype.is_complex or packed.dtype == torch.bool:
        raise ValueError(f"{name} must be uint8 or a real storage dtype viewing the same bytes, got {packed.dtype}")
    return packed.contiguous().view(torch.uint8).reshape(-1, 1)


def decode_absmax(nf4: NF4Weight) -> torch.Tensor:
    """fp32 [n_blocks] per-block scales: ``absmax`` itself, or the double-quant decoding.

    As bnb: ``fl(absmax_code[q] * absmax_scale[i // nested_blocksize])`` (dequantize_blockwise),
    then ``+ absmax_offset`` as a separate fp32 addition (``absmax += offset``), never an FMA.
    """
    if not nf4.double_quant:
        return nf4.absmax
    block = torch.arange(nf4.n_blocks, device=nf4.device) // nf4.nested_blocksize
    scaled = nf4.absmax_code[nf4.absmax.long()] * nf4.absmax_scale[block]
    return scaled + nf4.absmax_offset


def dequantize_nf4_reference(nf4: NF4Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The spec of NF4 decoding: [*nf4.shape] in ``nf4.dtype``, then cast to ``dtype`` (any float) if given.

    ``code[q] * absmax_f32`` in fp32 (NF4 or FP4 table), one cast to ``nf4.dtype``; bit-identical to
    ``bitsandbytes.functional.dequantize_4bit`` (whose CPU and torch kernels do exactly this).
    """
    if dtype is not None:
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    absmax = decode_absmax(nf4)
    n = nf4.numel
    values = nf4.code[_unpack_nibbles(nf4.packed, n)]
    padded = torch.nn.functional.pad(values, (0, nf4.n_blocks * nf4.blocksize - n))
    out = (padded.view(nf4.n_blocks, nf4.blocksize) * absmax[:, None]).reshape(-1)[:n].to(nf4.dtype)
    if dtype is not None and dtype != nf4.dtype:
        out = out.to(dtype)
    return out.reshape(nf4.shape)
