"""Fast checks of the memory tool: the layer profile on a tiny shape, and the model profile on the
tiny built-in Llama (PEFT vs patched vs LoRA-FA, dense and QLoRA, dropout 0 / 0.1)."""
import csv
import json

import pytest

from lora_kernels.ops import CPU_BACKEND_ENV
from lora_kernels.tools import memory, models

M, K, N, R = 33, 40, 24, 4
F32 = 4
BATCH, SEQ = 2, 32
# 2 decoder layers x 7 adapted projections in the tiny preset.
LORA_LAYERS = models.PRESETS["tiny"]["num_hidden_layers"] * len(models.TARGETS)


def test_memory_saved_activations(tmp_path):
    res = memory.run_layer(shapes=[(M, K, N, R)], device="cpu", dtype="fp32", dropouts=(0.0, 0.1),
                           out=tmp_path, verbose=False)
    for ext in ("json", "csv", "png"):
        assert (tmp_path / f"memory_float32.{ext}").stat().st_size > 0
    data = json.loads((tmp_path / "memory_float32.json").read_text())
    assert data["metadata"]["dtype"] == "float32"
    got = {(r["impl"], r["dropout_p"]): r for r in res["rows"]}

    h = M * R * F32
    # LoRA-FA keeps only h [M, r]; with dropout also the 8-byte seed.
    assert got[("lora_kernels_fa", 0.0)]["activation_bytes"] == h
    assert h < got[("lora_kernels_fa", 0.1)]["activation_bytes"] <= h + 16
    # Full LoRA adds x (needed for dA); dropout adds only the seed, not a dropped copy of x.
    assert got[("lora_kernels", 0.0)]["activation_bytes"] == M * K * F32 + h
    assert got[("lora_kernels", 0.1)]["activation_bytes"] <= M * K * F32 + h + 16
    assert got[("base", 0.0)]["activation_bytes"] == 0  # frozen W: F.linear saves no activation
    if ("peft", 0.0) in got:
        assert got[("peft", 0.0)]["activation_bytes"] >= M * K * F32
        # PEFT keeps the dropped copy of x (and its mask) on top.
        assert got[("peft", 0.1)]["activation_bytes"] >= 2 * M * K * F32
        assert got[("peft_fa", 0.1)]["activation_bytes"] > got[("lora_kernels_fa", 0.1)]["activation_bytes"]
    for r in res["rows"]:
        assert r["peak_fwdbwd_bytes"] is None  # CPU: no allocator statistics


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory_model")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CPU_BACKEND_ENV, "torch")  # the lean PyTorch path, not the interpreted kernels
        res = memory.run_model(device="cpu", dtype="fp32", batch=BATCH, seq=SEQ, out=out, verbose=False)
    return res, out


def _by_key(res):
    return {(r["variant"], r["qlora"], r["dropout_p"]): r for r in res["rows"]}


def test_model_profile_rows(model_run):
    res, _ = model_run
    assert res["errors"] == {}
    rows = _by_key(res)
    qloras = [False, True] if models.bitsandbytes_importable() else [False]
    assert set(rows) == {(v, q, p) for v in models.VARIANTS for q in qloras for p in (0.0, 0.1)}
    for (variant, q, p), r in rows.items():
        peft_row = rows["peft", q, p]
        assert r["ratio_vs_peft"] == r["saved_bytes"] / peft_row["saved_bytes"]
        assert r["peak_bytes"] is None and r["baseline_bytes"] is None  # CPU
        # The kinds partition the total; every decoder layer saved something.
        assert sum(r[f"{k}_bytes"] for k in memory.MODULE_KINDS) == r["saved_bytes"]
        assert len(r["layer_saved_bytes"]) == 2 and all(b > 0 for b in r["layer_saved_bytes"])
        assert sum(r["layer_saved_bytes"]) < r["saved_bytes"]  # the head and loss are outside the layers
        assert {memory.layer_index(m["name"]) for m in r["per_module"]} <= {None, 0}
        assert sum(m["saved_bytes"] for m in r["per_module"]) == r["saved_bytes"] - r["layer_saved_bytes"][1]
    for q in qloras:
        # Dropout costs exactly one 8-byte seed per patched LoRA layer, never a mask or a copy of x.
        seed_cost = {variant: rows[variant, q, 0.1]["saved_bytes"] - rows[variant, q, 0.0]["saved_bytes"]
                     for variant in ("lora_kernels", "lora_kernels_fa")}
        assert seed_cost["lora_kernels"] == 8 * LORA_LAYERS
        # LoRA-FA needs the mask only for dX: layer 0's q/k/v read the norm of the frozen embedding,
        # whose input needs no gradient, so those three keep no seed.
        assert seed_cost["lora_kernels_fa"] == 8 * (LORA_LAYERS - 3)
        assert rows["lora_kernels", q, 0.1]["saved_bytes"] < rows["peft", q, 0.1]["saved_bytes"]
        # PEFT's dropout copies live in the projections; the rest of the model is the same.
        for kind in ("attn_core", "mlp_act", "norm", "head_loss"):
            assert rows["lora_kernels", q, 0.1][f"{kind}_bytes"] == rows["peft", q, 0.1][f"{kind}_bytes"]
        for p in (0.0, 0.1):
            assert rows["lora_kernels_fa", q, p]["saved_bytes"] <= rows["lora_kernels", q, p]["saved_bytes"]
    if len(qloras) == 2:  # the NF4 base changes no saved activation (its quant state is no activation)
        for (variant, q, p), r in rows.items():
            if q:
                assert r["saved_bytes"] == rows[variant, False, p]["saved_bytes"]


def test_model_profile_files(model_run):
    res, out = model_run
    for ext in ("json", "csv", "png"):
        assert (out / f"memory_model_float32.{ext}").stat().st_size > 0
    data = json.loads((out / "memory_model_float32.json").read_text())
    meta = data["metadata"]
    for key in ("device", "torch", "triton", "bitsandbytes", "peft", "git_commit", "utc_date"):
        assert key in meta
    assert meta["dtype"] == "float32"
    assert data["config"]["preset"] == "tiny" and data["config"]["tokens"] == BATCH * SEQ
    assert len(data["rows"]) == len(res["rows"])
    with open(out / "memory_model_float32.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["saved_bytes"]) for r in table] == [r["saved_bytes"] for r in res["rows"]]


def test_cli_model_mode(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(CPU_BACKEND_ENV, "torch")
    res = memory.main(["--device", "cpu", "--batch", "1", "--seq", "16", "--variants", "peft,lora_kernels",
                       "--dropout", "0.1", "--no-qlora", "--out", str(tmp_path)])
    assert [(r["variant"], r["qlora"], r["dropout_p"]) for r in res["rows"]] == [
        ("peft", False, 0.1), ("lora_kernels", False, 0.1)]
    assert res["config"]["batch"] == 1 and res["config"]["seq"] == 16
    assert (tmp_path / "memory_model_float32.json").exists()
    assert "lora_kernels p=0.1" in capsys.readouterr().out


def test_run_dispatch(monkeypatch):
    # `python -m lora_kernels all` calls memory.run(device=, dtype=, out=): the model profile.
    calls = []
    monkeypatch.setattr(memory, "run_model", lambda **kw: calls.append(("model", kw)) or {})
    monkeypatch.setattr(memory, "run_layer", lambda **kw: calls.append(("layer", kw)) or {})
    memory.run(device="cpu", dtype="fp32", out="x")
    memory.run(device="cpu", layer=True, shapes=[(1, 2, 3, 4)])
    assert calls == [("model", {"device": "cpu", "dtype": "fp32", "out": "x"}),
                     ("layer", {"device": "cpu", "dtype": None, "out": None, "shapes": [(1, 2, 3, 4)]})]


@pytest.mark.parametrize("kwargs, match", [
    ({"preset": "huge"}, "preset"),
    ({"batch": 0}, "batch"),
    ({"seq": 1.5}, "seq"),
    ({"variants": ["lora"]}, "variants"),
    ({"dropouts": [1.0]}, "dropouts"),
    ({"qlora": "yes"}, "qlora"),
])
def test_model_bad_args(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        memory.run_model(device="cpu", out=tmp_path, verbose=False, **kwargs)
    assert not any(tmp_path.iterdir())


def test_cli_shapes_need_layer_mode(tmp_path):
    with pytest.raises(ValueError, match="--layer"):
        memory.main(["--device", "cpu", "--shapes", "8,8,8,4", "--out", str(tmp_path)])


def test_module_kinds():
    base = "base_model.model.model.layers.3"
    assert memory.module_kind(f"{base}.self_attn.q_proj.lora_A.default", "Linear") == "attn_proj"
    assert memory.module_kind(f"{base}.mlp.down_proj", "Linear") == "mlp_proj"
    assert memory.module_kind(f"{base}.mlp.act_fn", "SiLUActivation") == "mlp_act"
    assert memory.module_kind(f"{base}.self_attn", "LlamaAttention") == "attn_core"
    assert memory.module_kind(f"{base}.input_layernorm", "LlamaRMSNorm") == "norm"
    assert memory.module_kind("base_model.model", "LlamaForCausalLM") == "head_loss"
    assert memory.module_kind("base_model.model.model.embed_tokens", "Embedding") == "embedding"
    assert memory.layer_index(f"{base}.mlp") == 3 and memory.layer_index("base_model.model.lm_head") is None


def test_model_profile_with_dora(tmp_path, monkeypatch):
    # DoRA models: PEFT vs patched, written beside (not over) the LoRA file
    monkeypatch.setenv(CPU_BACKEND_ENV, "torch")
    res = memory.run_model(device="cpu", dtype="fp32", batch=BATCH, seq=SEQ, out=tmp_path, verbose=False,
                           dora=True, dropouts=(0.0,), qlora=False, plot=False)
    assert res["errors"] == {} and res["config"]["dora"] is True
    rows = _by_key(res)
    assert set(rows) == {(v, False, 0.0) for v in models.VARIANTS}
    # PEFT's DoRA keeps two [M, N] results per layer besides x; the fused path one
    assert rows["lora_kernels", False, 0.0]["saved_bytes"] < 0.75 * rows["peft", False, 0.0]["saved_bytes"]
    assert (tmp_path / "memory_model_float32_dora.json").exists()
    assert not (tmp_path / "memory_model_float32.json").exists()
    with pytest.raises(TypeError, match="dora"):
        memory.run_model(device="cpu", out=tmp_path, dora="yes")


def test_cuda_peak_runs_the_backward_inside_the_providers_setting(monkeypatch):
    # A provider's route is an environment setting its forward and backward both run in (Impl.around);
    # the peak measurement must not run the backward outside it. torch.cuda's counters stubbed: CPU.
    import os

    import torch

    from lora_kernels.tools.bench import Impl

    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    for name in ("memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: 0)
    seen = []

    def around(fn):
        def run():
            monkeypatch.setenv("LORA_KERNELS_TEST_ROUTE", "on")
            try:
                return fn()
            finally:
                monkeypatch.delenv("LORA_KERNELS_TEST_ROUTE")
        return run

    w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(2, 4)
    w.register_hook(lambda g: seen.append(os.environ.get("LORA_KERNELS_TEST_ROUTE")))
    impl = Impl("p", lambda: x @ w.t(), [w], around=around)
    memory.cuda_peak(impl, torch.ones(2, 3))
    assert seen == ["on"]
