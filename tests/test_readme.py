"""The README's Python examples run as written (with the names they assume defined here), so the
documented API cannot drift from the code."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def python_blocks() -> list:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _namespace() -> dict:
    """The objects the examples take as given: a layer, its input and adapters, a PEFT model."""
    torch.manual_seed(0)
    K, N, r = 64, 48, 8
    base = torch.nn.Linear(K, N)
    base.weight.requires_grad_(False)
    model = torch.nn.Sequential(torch.nn.Linear(K, K))  # replaced below where a LoRA model is needed
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=50)
    return {
        "torch": torch, "peft": peft, "x": torch.randn(2, 5, K), "base": base, "weight": base.weight.detach(),
        "bias": base.bias.detach(), "lora_A": torch.randn(r, K, requires_grad=True),
        "lora_B": torch.randn(N, r, requires_grad=True), "alpha": 16, "r": r, "model": model,
        "linear": torch.nn.Linear(K, N), "base_model": transformers.LlamaForCausalLM(cfg),
        "lora_config": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    }


def test_readme_has_the_examples():
    assert len(python_blocks()) >= 4


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(index, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "torch")
    ns = _namespace()
    code = python_blocks()[index]
    if "dylora_sample_rank(model)" in code:  # the variants example: a model made of DyLoRA layers
        from lora_kernels import DyLoRALinear
        ns["model"] = torch.nn.Sequential(DyLoRALinear(64, 64, 16, 32), DyLoRALinear(64, 48, 16, 32))
    exec(compile(code, f"README.md python block {index}", "exec"), ns)
    if "y" in ns:  # the functional examples computed an output of the documented shape
        assert ns["y"].shape == (2, 5, 48)


def test_every_environment_variable_the_package_reads_is_documented():
    root = README.parent
    sources = [*root.glob("lora_kernels/**/*.py"), *root.glob("benchmarks/*.py"), root / "setup.py",
               root / "csrc" / "build_flags.py"]
    names = set()
    for path in sources:
        names |= set(re.findall(r'"(LORA_KERNELS_[A-Z0-9_]+)"', path.read_text()))
    assert "LORA_KERNELS_FUSED_FORWARD_MIN_M" in names  # the scan finds them
    documented = set(re.findall(r"^\| `(LORA_KERNELS_[A-Z0-9_]+)", README.read_text(), flags=re.M))
    assert names <= documented, sorted(names - documented)
