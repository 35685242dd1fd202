"""Built-in Llama-style models for the memory profile and the end-to-end benchmark.

Random initialisation from a ``transformers.LlamaConfig`` (nothing is downloaded), LoRA on the seven
projections through PEFT, optionally with the projections replaced by bitsandbytes NF4 ``Linear4bit``
(as ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))`` loads them)
and optionally patched with ``lora_kernels.patch_peft_model``. Every variant built with the same seed
holds the same weights, so PEFT and patched runs are comparable step by step.

Presets (``PRESETS``): ``tiny`` (CPU default), ``facts`` (FACTS.md's memory model), ``1b`` (a
Llama-3.2-1B-shaped model, the GPU default).
"""
import copy
import gc
from dataclasses import dataclass
from typing import Optional

import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Every in_features a multiple of 64 (bnb 0.50's CPU NF4 path needs rows that start on a block).
PRESETS = {
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1000),
    "facts": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=1000),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
}
VARIANTS = ("peft", "lora_kernels", "lora_kernels_fa")


@dataclass(frozen=True)
class ModelSpec:
    """What to build. ``variant``: "peft" (PEFT as is), "lora_kernels" (patched), "lora_kernels_fa"
    (patched with lora_A frozen). ``qlora``: NF4 base weights (bitsandbytes Linear4bit). ``dora``:
    PEFT's DoRA adapters (``use_dora=True``) instead of plain LoRA."""
    preset: str = "tiny"
    variant: str = "peft"
    qlora: bool = False
    dropout: float = 0.0
    r: int = 16
    alpha: int = 32
    dora: bool = False

    @property
    def label(self) -> str:
        name = {"peft": "peft_qlora" if self.qlora else "peft"}.get(
            self.variant, self.variant.replace("lora_kernels", "lora_kernels_qlora" if self.qlora else "lora_kernels"))
        return f"{name}{' DoRA' if self.dora else ''} p={self.dropout:g}"


def bitsandbytes_importable() -> bool:
    """Whether the QLoRA variants can be built here (bitsandbytes imports, its native library too)."""
    try:
        import bitsandbytes  # noqa: F401
        return True
    except Exception:  # ImportError, or a native-library failure at import
        return False


def free_memory(device) -> None:
    """Release a dropped model's memory before building the next one (benchmarks build one per variant)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def default_preset(device: torch.device) -> str:
    return "1b" if torch.device(device).type == "cuda" else "tiny"


def llama_config(preset: str):
    import transformers

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return transformers.LlamaConfig(**PRESETS[preset])


_BASE_CACHE: dict = {}  # (preset, seed) -> the last CPU fp32 model built (one entry)


def build_base_model(preset: str = "tiny", device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                     cache: bool = True):
    """``LlamaForCausalLM`` with random weights (same seed, same weights), on ``device`` in ``dtype``.

    The weights are initialised on CPU (independent of the device's RNG). With ``cache`` the last CPU
    model is kept (one entry, in host memory) and copied for the next call with the same preset and
    seed: a benchmark builds one model per variant, and random init of the 1b preset takes far longer
    than a copy."""
    import transformers

    key = (preset, seed)
    cpu_model = _BASE_CACHE.get(key) if cache else None
    if cpu_model is None:
        cfg = llama_config(preset)
        torch.manual_seed(seed)
        with torch.device("cpu"):
            cpu_model = transformers.LlamaForCausalLM(cfg)
        _BASE_CACHE.clear()
        if cache:
            _BASE_CACHE[key] = cpu_model
    model = copy.deepcopy(cpu_model) if cache else cpu_model
    return model.to(device=device, dtype=dtype)


def quantize_projections(model, compute_dtype: torch.dtype, targets=TARGETS, quant_storage=torch.uint8,
                         quant_type: str = "nf4"):
    """Replace the ``targets`` nn.Linear layers with bitsandbytes 4-bit ``Linear4bit`` (``quant_type``
    "nf4" or "fp4", block 64, double quantization), quantized on the layer's device, as transformers'
    4-bit loading does."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise RuntimeError("QLoRA models need bitsandbytes (pip install bitsandbytes)") from exc
    for module in list(model.modules()):
        for name in targets:
            lin = getattr(module, name, None)
            if not isinstance(lin, torch.nn.Linear):
                continue
            device = lin.weight.device
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=compute_dtype, quant_type=quant_type, compress_statistics=True,
                                  quant_storage=quant_storage, device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data.to("cpu", copy=True), requires_grad=False,
                                         quant_type=quant_type, compress_statistics=True, quant_storage=quant_storage,
                                         module=q)
            if lin.bias is not None:
                q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
            setattr(module, name, q.to(device))  # .to quantizes
    model.is_loaded_in_4bit = True  # what transformers sets: PEFT then wraps in lora.bnb.Linear4bit
    return model


def build_lora_model(spec: ModelSpec, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """The PEFT model of ``spec`` in training mode: base frozen, LoRA (r, alpha, dropout) on TARGETS,
    B initialised randomly from ``seed`` (PEFT's zero init would make the LoRA gradient of A zero)."""
    if spec.variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {spec.variant!r}")
    device = torch.device(device)
    model = build_base_model(spec.preset, device, dtype, seed)
    if spec.qlora:
        model = quantize_projections(model, compute_dtype=dtype)
    return add_lora(model, spec.variant, TARGETS, spec.r, spec.alpha, device, seed + 1, dropout=spec.dropout,
                    dora=spec.dora)


def add_lora(model: torch.nn.Module, variant: str, targets, r: int, alpha: float, device, seed: int,
             dropout: float = 0.0, dora: bool = False):
    """``model`` wrapped by PEFT (LoRA on the modules named ``targets``, adapters drawn from ``seed``,
    B random too), patched by lora_kernels unless ``variant`` is "peft" (``VARIANTS``), on ``device``
    in training mode."""
    import peft

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
                          init_lora_weights=False, use_dora=dora)
    torch.manual_seed(seed)
    model = peft.get_peft_model(model, cfg)  # PEFT default: fp32 adapters on a bf16/fp16 model
    model = model.to(device)
    if variant != "peft":
        import lora_kernels

        lora_kernels.patch_peft_model(model, lora_fa=variant == "lora_kernels_fa")
    return model.train()


def random_batch(preset: str, batch: int, seq: int, device="cpu", seed: int = 1) -> torch.Tensor:
    """input_ids [batch, seq] drawn uniformly from the preset's vocabulary."""
    vocab = PRESETS[preset]["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


def lora_parameters(model):
    return [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]


def param_bytes(model, trainable: Optional[bool] = None) -> int:
    """Bytes of the model's parameters (all, or only trainable / frozen ones)."""
    return sum(p.numel() * p.element_size() for p in model.parameters()
               if trainable is None or p.requires_grad == trainable)
