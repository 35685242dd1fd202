"""LoRA+ parameter groups: identical to PEFT's create_loraplus_optimizer groups."""
import pytest
import torch
from torch import nn

import lora_kernels
from lora_kernels import loraplus_param_groups
from lora_kernels.integrations.loraplus import loraplus_optimizer

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from packaging.version import Version  # noqa: E402
from peft.optimizers import create_loraplus_optimizer  # noqa: E402

# Before PEFT 0.21 create_loraplus_optimizer looked the tuner layer up by the parameter's own name, so it
# never found an Embedding: an embedding's lora_embedding_A/B went to the A/B groups, lr_embedding unused.
# loraplus_param_groups follows 0.21's groups, which the paper's rule gives.
needs_peft_embedding_groups = pytest.mark.skipif(Version(peft.__version__) < Version("0.21"),
                                                 reason="PEFT < 0.21 groups LoRA embeddings as A/B (fixed in 0.21)")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]


class _WithNormAndHead(nn.Module):
    """A PEFT-wrappable model with a trainable LayerNorm and a trainable biased head: exercises the
    decay / no-decay split of the B groups (1-D parameters go with B)."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 32)
        self.q_proj = nn.Linear(32, 32)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 8)

    def forward(self, ids):
        return self.head(self.norm(self.q_proj(self.embed_tokens(ids))))


def _peft_models():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=100)
    llama = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_bias=False))
    small = peft.get_peft_model(_WithNormAndHead(), peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"],
                                                                      modules_to_save=["norm", "head"]))
    return {"llama": llama, "norm_and_head": small}


def test_groups_match_peft_on_a_qlora_model():
    from tests.integrations.test_peft_patch import peft_model
    model = peft_model(qlora=True)
    lora_kernels.patch_peft_model(model)
    reference = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16.0)
    ref_groups = [{k: g[k] for k in ("params", "lr", "weight_decay")} for g in reference.param_groups]
    ours = loraplus_param_groups(model, 1e-4)
    assert _summary(ours) == _summary(ref_groups) and len(ours[2]["params"]) == 14


def _summary(groups):
    return [([id(p) for p in g["params"]], g["lr"], g["weight_decay"]) for g in groups]


@needs_peft_embedding_groups
@pytest.mark.parametrize("name", ["llama", "norm_and_head"])
@pytest.mark.parametrize("patched", [False, True])
def test_groups_match_peft(name, patched):
    model = _peft_models()[name]
    if patched:
        lora_kernels.patch_peft_model(model)
    kwargs = dict(lr=3e-4, loraplus_lr_ratio=8.0, loraplus_weight_decay=0.01, loraplus_lr_embedding=2e-6)
    reference = create_loraplus_optimizer(model, torch.optim.AdamW, **kwargs)
    ours = loraplus_param_groups(model, 3e-4, 8.0, weight_decay=0.01, lr_embedding=2e-6)
    ref_groups = [{k: g[k] for k in ("params", "lr", "weight_decay")} for g in reference.param_groups]
    assert _summary(ours) == _summary(ref_groups)
    # Every group the test relies on is populated (the comparison is not between empty lists).
    sizes = [len(g["params"]) for g in ours]
    assert sizes[0] > 0 and sizes[1] > 0 and sizes[2] + sizes[3] > 0
    if name == "norm_and_head":
        # The modules_to_save copies: the LayerNorm's weight and bias (inside a norm) and the head's bias
        # ("bias") are 1-D without decay; the head's 2-D weight goes with A.
        names = {id(p): n for n, p in model.named_parameters()}
        assert sorted(names[id(p)].split(".")[2] + "." + names[id(p)].split(".")[-1] for p in ours[3]["params"]) == \
            ["head.bias", "norm.bias", "norm.weight"]
        assert any("head.modules_to_save" in names[id(p)] for p in ours[0]["params"])


@needs_peft_embedding_groups
def test_a_bare_peft_embedding_layer_groups_as_peft_s():
    # PEFT looks for the tuner layer below the model only: a layer passed as the model is none
    model = peft.get_peft_model(nn.Sequential(nn.Embedding(10, 8)), peft.LoraConfig(r=2, target_modules=["0"]))
    for module in (model.base_model.model[0], model):
        reference = create_loraplus_optimizer(module, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4.0)
        ref_groups = [{k: g[k] for k in ("params", "lr", "weight_decay")} for g in reference.param_groups]
        assert _summary(loraplus_param_groups(module, 1e-3, 4.0)) == _summary(ref_groups)


def test_lora_kernels_modules_and_optimizer():
    model = nn.Sequential(lora_kernels.LoRALinear(16, 16, r=4, alpha=8),
                          lora_kernels.LoRALinear(16, 8, r=4, alpha=8))
    groups = loraplus_param_groups(model, 1e-3)
    assert [len(g["params"]) for g in groups] == [2, 0, 2, 0]
    assert all(p.shape[0] == 4 for p in groups[0]["params"])  # lora_A [r, in]
    assert groups[2]["lr"] == pytest.approx(16e-3)
    opt = loraplus_optimizer(model, torch.optim.SGD, lr=1e-3, ratio=4.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-6, 4e-3, 4e-3])


def test_bad_arguments():
    model = lora_kernels.LoRALinear(8, 8, r=2, alpha=4)
    with pytest.raises(TypeError, match="model"):
        loraplus_param_groups(object(), 1e-3)
    for kwargs, word in ((dict(lr=0.0), "lr"), (dict(lr=1e-3, ratio=-1.0), "ratio"),
                         (dict(lr=1e-3, weight_decay=-0.1), "weight_decay"),
                         (dict(lr=1e-3, lr_embedding=0.0), "lr_embedding"), (dict(lr=float("nan")), "lr"),
                         (dict(lr=1e200, ratio=1e200), r"lr \* ratio"), (dict(lr=1e-200, ratio=1e-200), r"lr \* ratio")):
        with pytest.raises(ValueError, match=word):
            loraplus_param_groups(model, **kwargs)
    with pytest.raises(TypeError, match="ratio"):
        loraplus_param_groups(model, 1e-3, ratio="16")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="require grad"):
        loraplus_param_groups(model, 1e-3)
