"""Built-in benchmark models: same seed, same weights for every variant (cached or not)."""
import pytest
import torch

from lora_kernels.tools import models

pytest.importorskip("peft")
pytest.importorskip("transformers")


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_same_seed_same_weights_cached_or_not():
    a = _state(models.build_base_model("tiny", seed=3))
    b = _state(models.build_base_model("tiny", seed=3))          # from the cache
    c = _state(models.build_base_model("tiny", seed=3, cache=False))
    d = _state(models.build_base_model("tiny", seed=4))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], d["model.layers.0.self_attn.q_proj.weight"])
    # the cached model is copied: changing a built model does not change the next one
    m = models.build_base_model("tiny", seed=3)
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.weight.zero_()
    assert models.build_base_model("tiny", seed=3).model.layers[0].self_attn.q_proj.weight.abs().sum() > 0


def test_variants_share_base_and_adapters(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "torch")
    built = {v: models.build_lora_model(models.ModelSpec(variant=v, r=4, alpha=8), seed=1) for v in models.VARIANTS}
    states = {v: {k: p for k, p in m.named_parameters()} for v, m in built.items()}
    names = list(states["peft"])
    assert all(list(s) == names for s in states.values())
    for k in names:
        assert all(torch.equal(states["peft"][k], s[k]) for s in states.values()), k
    assert not states["lora_kernels_fa"][next(k for k in names if "lora_A" in k)].requires_grad
    ids = models.random_batch("tiny", 2, 8)
    assert ids.shape == (2, 8) and int(ids.max()) < models.PRESETS["tiny"]["vocab_size"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="preset"):
        models.llama_config("7b")
    with pytest.raises(ValueError, match="variant"):
        models.build_lora_model(models.ModelSpec(variant="unsloth"))


def test_dora_spec_builds_peft_dora_layers(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "torch")
    spec = models.ModelSpec(variant="lora_kernels", r=4, alpha=8, dora=True)
    model = models.build_lora_model(spec, seed=1)
    layers = [m for m in model.modules() if hasattr(m, "lora_magnitude_vector")]
    assert len(layers) == 7 * models.PRESETS["tiny"]["num_hidden_layers"]
    assert all(m.use_dora["default"] for m in layers)
    assert spec.label == "lora_kernels DoRA p=0"
