"""Rank analysis of LoRA adapters against brute-force float64 SVDs of the full ΔW."""
import json
import math

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import given, settings, strategies as st

import lora_kernels
from lora_kernels import NF4Weight
from lora_kernels.__main__ import main as cli
from lora_kernels.tools import rank_analysis as ra
from tests.helpers import assert_close


def _adapter(N, K, r, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, K, generator=g).to(dtype), torch.randn(N, r, generator=g).to(dtype)


def _full_svd(A, B, scale):
    delta = scale * B.double() @ A.double()
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return delta, U, S, Vh.t()


@pytest.mark.parametrize("N,K,r", [(37, 53, 1), (37, 53, 5), (64, 29, 16), (9, 200, 12), (5, 7, 6)])
def test_delta_svd_matches_full_svd(N, K, r):
    A, B = _adapter(N, K, r, seed=N + K + r)
    svd = ra.delta_svd(A, B, scale=0.7)
    delta, U, S, V = _full_svd(A, B, 0.7)
    q = min(N, K, r)
    assert svd.S.shape == (q,) and svd.U.shape == (N, q) and svd.V.shape == (K, q)
    assert torch.allclose(svd.S, S[:q], rtol=1e-10, atol=1e-12 * float(S[0]))
    # U diag(S) V^T reconstructs ΔW; U, V are orthonormal
    rebuilt = svd.U @ torch.diag(svd.S) @ svd.V.t()
    assert float((rebuilt - delta).norm() / delta.norm()) < 1e-12
    assert torch.allclose(svd.U.t() @ svd.U, torch.eye(q, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(svd.V.t() @ svd.V, torch.eye(q, dtype=torch.float64), atol=1e-10)
    assert svd.frobenius == pytest.approx(float(delta.norm()), rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 60), K=st.integers(1, 60), r=st.integers(1, 128), seed=st.integers(0, 2 ** 20),
       half=st.booleans())
def test_delta_svd_any_shape(N, K, r, seed, half):
    A, B = _adapter(N, K, r, seed, torch.bfloat16 if half else torch.float32)
    svd = ra.delta_svd(A, B, scale=1.5)
    delta, _, S, _ = _full_svd(A, B, 1.5)
    q = min(N, K, r)
    assert svd.S.shape == (q,)
    assert torch.allclose(svd.S, S[:q], rtol=1e-9, atol=1e-11 * float(S[0]))
    rebuilt = svd.U @ torch.diag(svd.S) @ svd.V.t()
    assert float((rebuilt - delta).norm()) <= 1e-10 * float(delta.norm())


def test_effective_rank_of_a_rank_deficient_adapter():
    A, B = _adapter(40, 30, 8, seed=3)
    A[4:] = A[:4] * 2.0  # rows 4..7 repeat rows 0..3: ΔW has rank 4
    svd = ra.delta_svd(A, B)
    assert float(svd.S[4:].max()) < 1e-10 * float(svd.S[0])
    assert svd.effective_rank(1.0) == 4
    power = svd.S.square()
    k = svd.effective_rank(0.5)
    assert float(power[:k].sum()) >= 0.5 * float(power.sum()) > float(power[:k - 1].sum())
    assert ra.delta_svd(torch.zeros(3, 5), torch.randn(4, 3)).effective_rank() == 0


def test_subspace_similarity_against_brute_force():
    A1, B1 = _adapter(48, 40, 8, seed=1)
    A2, B2 = _adapter(48, 40, 6, seed=2)
    s1, s2 = ra.delta_svd(A1, B1, 2.0), ra.delta_svd(A2, B2, 0.5)
    _, U1, _, V1 = _full_svd(A1, B1, 2.0)
    _, U2, _, V2 = _full_svd(A2, B2, 0.5)
    grid = ra.similarity_grid(s1, s2)
    grid_right = ra.similarity_grid(s1, s2, side="right")
    for i in range(1, 9):
        for j in range(1, 7):
            # singular vectors are defined up to sign: the squared norm of the overlap is not
            expect = float((U1[:, :i].t() @ U2[:, :j]).square().sum()) / min(i, j)
            expect_right = float((V1[:, :i].t() @ V2[:, :j]).square().sum()) / min(i, j)
            assert ra.subspace_similarity(s1, s2, i, j) == pytest.approx(expect, abs=1e-10)
            assert float(grid[i - 1, j - 1]) == pytest.approx(expect, abs=1e-10)
            assert float(grid_right[i - 1, j - 1]) == pytest.approx(expect_right, abs=1e-10)
            assert 0.0 <= expect <= 1.0 + 1e-12


def test_subspace_similarity_limits():
    A, B = _adapter(30, 20, 6, seed=5)
    s = ra.delta_svd(A, B)
    assert ra.subspace_similarity(s, s, 6, 6) == pytest.approx(1.0, abs=1e-12)
    assert ra.subspace_similarity(s, s, 2, 5) == pytest.approx(1.0, abs=1e-12)  # nested spans
    # B columns in orthogonal coordinate blocks: disjoint output subspaces
    B1, B2 = torch.zeros(30, 3), torch.zeros(30, 3)
    B1[:10] = torch.randn(10, 3)
    B2[15:25] = torch.randn(10, 3)
    o1, o2 = ra.delta_svd(A[:3], B1), ra.delta_svd(A[:3], B2)
    assert ra.subspace_similarity(o1, o2, 3, 3) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("rows_per_chunk", [1, 7, 4096, None])
def test_base_projection_dense_and_nf4(rows_per_chunk):
    N, K, r = 24, 40, 4
    A, B = _adapter(N, K, r, seed=7)
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(8))
    svd = ra.delta_svd(A, B, 0.25)
    _, U, S, V = _full_svd(A, B, 0.25)
    for k in (1, 3, 4):
        got = ra.base_projection(W, svd, k, rows_per_chunk=rows_per_chunk)
        expect = float((U[:, :k].t() @ W.double() @ V[:, :k]).norm())
        assert got["projection"] == pytest.approx(expect, rel=1e-10)
        assert got["delta_frobenius"] == pytest.approx(float(S[:k].norm()), rel=1e-12)
        assert got["amplification"] == pytest.approx(float(S[:k].norm()) / expect, rel=1e-10)
        assert got["weight_frobenius"] == pytest.approx(float(W.double().norm()), rel=1e-12)
    # NF4 base weight: exactly the projection of its dequantized (bnb-exact) weight, decoded by row blocks
    q = NF4Weight.quantize(W.to(torch.bfloat16), double_quant=True)  # 960 elements: blocks span rows
    got = ra.base_projection(q, svd, 3, rows_per_chunk=rows_per_chunk)
    Wq = q.dequantize().double()
    assert got["projection"] == pytest.approx(float((U[:, :3].t() @ Wq @ V[:, :3]).norm()), rel=1e-10)
    assert got["weight_frobenius"] == pytest.approx(float(Wq.norm()), rel=1e-12)


def test_base_projection_default_blocks_fit_the_element_budget(monkeypatch):
    """By default a block of W₀ rows holds at most CHUNK_ELEMENTS values (at least one row), whatever
    N is: a fixed row count decoded a 4096 x 4096 weight whole, in float64."""
    N, K = 24, 40
    A, B = _adapter(N, K, 4, seed=7)
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(8))
    svd = ra.delta_svd(A, B, 0.25)
    blocks, row_chunks = [], ra._row_chunks

    def recording_row_chunks(weight, rows):
        for chunk in row_chunks(weight, rows):
            blocks.append(chunk.numel())
            yield chunk

    monkeypatch.setattr(ra, "_row_chunks", recording_row_chunks)
    monkeypatch.setattr(ra, "CHUNK_ELEMENTS", 100)
    expect = ra.base_projection(W, svd, 3, rows_per_chunk=N)["projection"]
    for weight in (W, NF4Weight.quantize(W, double_quant=True)):
        blocks.clear()
        got = ra.base_projection(weight, svd, 3)["projection"]
        assert blocks and max(blocks) <= 100 and sum(blocks) == N * K, blocks
        if weight is W:
            assert got == pytest.approx(expect, rel=1e-12)
    monkeypatch.setattr(ra, "CHUNK_ELEMENTS", 10)  # below one row: one row at a time
    blocks.clear()
    ra.base_projection(W, svd, 3)
    assert blocks == [K] * N


def test_bad_arguments():
    A, B = _adapter(10, 12, 4, seed=0)
    s = ra.delta_svd(A, B)
    with pytest.raises(ValueError, match="share r"):
        ra.delta_svd(A, B[:, :3])
    with pytest.raises(TypeError, match="lora_A"):
        ra.delta_svd(A.numpy(), B)
    with pytest.raises(ValueError, match="lora_B"):
        ra.delta_svd(A, B[0])
    with pytest.raises(ValueError, match="i must be"):
        ra.subspace_similarity(s, s, 5, 1)
    with pytest.raises(ValueError, match="j must be"):
        ra.subspace_similarity(s, s, 1, 0)
    with pytest.raises(ValueError, match="different spaces"):
        ra.subspace_similarity(s, ra.delta_svd(*_adapter(11, 12, 4, seed=1)), 1, 1)
    with pytest.raises(ValueError, match="side"):
        ra.similarity_grid(s, s, side="up")
    with pytest.raises(TypeError, match="svd1"):
        ra.subspace_similarity((A, B), s, 1, 1)
    with pytest.raises(ValueError, match="weight must be"):
        ra.base_projection(torch.randn(10, 13), s)
    with pytest.raises(ValueError, match="k must be"):
        ra.base_projection(torch.randn(10, 12), s, k=5)
    with pytest.raises(ValueError, match="energy"):
        s.effective_rank(0.0)
    with pytest.raises(TypeError, match="energy"):
        s.effective_rank("0.9")
    with pytest.raises(TypeError, match="i must be an int"):
        ra.subspace_similarity(s, s, 1.0, 1)
    assert ra.subspace_similarity(s, s, np.int64(1), 1) == pytest.approx(1.0)  # numpy ints are ints
    with pytest.raises(TypeError, match="scale"):
        ra.delta_svd(A, B, None)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lora_A must be finite"):
            ra.delta_svd(torch.where(A > 0, A, bad), B)
        with pytest.raises(ValueError, match="weight must be finite"):
            ra.base_projection(torch.randn(10, 12).index_fill_(0, torch.tensor([7]), bad), s)


# --------------------------------------------------------------------------------------------- PEFT adapters
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _saved_adapter(tmp_path, name, seed, **lora_kwargs):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=50)
    base = transformers.LlamaForCausalLM(cfg)
    model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **lora_kwargs))
    model.save_pretrained(tmp_path / name)
    return model, base


@pytest.mark.parametrize("rslora", [True, False])
def test_load_peft_adapter_matches_the_model(tmp_path, rslora):
    # PEFT matches the patterns against the module name (an anchored one too), not the saved key
    kwargs = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=rslora,
                  rank_pattern={"down_proj": 4, "^model.layers.0.self_attn.q_proj": 2},
                  alpha_pattern={"v_proj": 5, "^model.layers.0.self_attn.q_proj": 3})
    model, _ = _saved_adapter(tmp_path, "a", 0, **kwargs)
    layers = ra.load_peft_adapter(tmp_path / "a")
    peft_layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(layers) == len(peft_layers) == 3
    for name, (A, B, scale) in layers.items():
        layer = next(m for n, m in peft_layers.items() if n.endswith(name.removeprefix("base_model.model.")))
        assert torch.equal(A, layer.lora_A["default"].weight.detach())
        assert torch.equal(B, layer.lora_B["default"].weight.detach())
        assert scale == pytest.approx(layer.scaling["default"], rel=1e-12)


def test_analyze_cli(tmp_path):
    kwargs = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model, base = _saved_adapter(tmp_path, "a", 0, **kwargs)
    _saved_adapter(tmp_path, "b", 1, **kwargs)
    from safetensors.torch import save_file
    base_sd = {k: v.contiguous() for k, v in base.state_dict().items() if "lora_" not in k and "base_layer" in k}
    base_sd = {k.replace(".base_layer", ""): v for k, v in base_sd.items()}
    save_file(base_sd, str(tmp_path / "base.safetensors"))
    cli(["analyze", str(tmp_path / "a"), "--compare", str(tmp_path / "b"), "--base", str(tmp_path / "base.safetensors"),
         "--top", "4", "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert (tmp_path / "out" / "spectra.png").stat().st_size > 0
    assert result["metadata"]["torch"] and len(result["rows"]) == 2
    layers = ra.load_peft_adapter(tmp_path / "a")
    other = ra.load_peft_adapter(tmp_path / "b")
    for row in result["rows"]:
        A, B, scale = layers[row["layer"]]
        _, U, S, V = _full_svd(A, B, scale)
        assert row["singular_values"] == pytest.approx(S[:8].tolist(), rel=1e-9)
        s1, s2 = ra.delta_svd(A, B, scale), ra.delta_svd(*other[row["layer"]])
        assert row["similarity_top1"] == pytest.approx(ra.subspace_similarity(s1, s2, 1, 1), abs=1e-12)
        W = base_sd[row["layer"].removeprefix("base_model.model.") + ".weight"].double()
        assert row["base_projection"] == pytest.approx(float((U[:, :4].t() @ W @ V[:, :4]).norm()), rel=1e-9)
        assert not math.isnan(row["base_amplification"])
    with pytest.raises(ValueError, match="adapter_config.json"):
        ra.load_peft_adapter(tmp_path)


def test_analyze_gpt2_adapter_with_conv1d_base(tmp_path):
    """GPT-2's Conv1D keeps W [in, out] (PEFT: fan_in_fan_out=True): the base projection uses W^T
    [out, in] like ΔW, also for the square attention output projection."""
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=16, vocab_size=50)
    base = transformers.GPT2LMHeadModel(cfg)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                      fan_in_fan_out=True, init_lora_weights=False))
    model.save_pretrained(tmp_path / "a")
    from safetensors.torch import save_file
    base_sd = {k.replace(".base_layer", ""): v.contiguous() for k, v in base.state_dict().items()
               if "lora_" not in k and "base_layer" in k}
    save_file(base_sd, str(tmp_path / "base.safetensors"))
    result = ra.analyze_adapter(tmp_path / "a", base=tmp_path / "base.safetensors", top=3)
    layers = ra.load_peft_adapter(tmp_path / "a")
    assert len(result["rows"]) == 3 and any(row["N"] == row["K"] for row in result["rows"])  # attn.c_proj
    for row in result["rows"]:
        A, B, scale = layers[row["layer"]]
        _, U, S, V = _full_svd(A, B, scale)
        W = base_sd[row["layer"].removeprefix("base_model.model.") + ".weight"].double()
        assert W.shape == (row["K"], row["N"])  # Conv1D layout
        assert row["base_projection"] == pytest.approx(float((U[:, :3].t() @ W.t() @ V[:, :3]).norm()), rel=1e-9)


def test_adalora_adapter_with_a_layer_pruned_to_rank_0(tmp_path):
    """AdaLoRA's budget can prune a layer whole (its saved lora_A is [0, K]): that layer has ΔW = 0 and
    no singular values; the others match PEFT's ΔW, and a patched model runs the file like PEFT."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=50)
    base_sd = transformers.LlamaForCausalLM(cfg).state_dict()

    def base_model():
        model = transformers.LlamaForCausalLM(cfg).eval()
        model.load_state_dict(base_sd)
        return model

    model = peft.get_peft_model(base_model(), peft.AdaLoraConfig(
        init_r=4, target_r=2, total_step=10, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_E" in n or "lora_B" in n:
                p.normal_()
    # what update_and_allocate stores at the end of its schedule: q_proj lost every triplet
    model.peft_config["default"].rank_pattern = {"model.layers.0.self_attn.q_proj.lora_E": [False] * 4,
                                                 "model.layers.0.self_attn.v_proj.lora_E": [True, False, True, True]}
    model.save_pretrained(tmp_path / "a")
    loaded = peft.PeftModel.from_pretrained(base_model(), tmp_path / "a")
    result = ra.analyze_adapter(tmp_path / "a", compare_dir=tmp_path / "a")
    rows = {row["layer"].rsplit(".", 1)[-1]: row for row in result["rows"]}
    assert rows["q_proj"]["r"] == 0 and rows["q_proj"]["singular_values"] == []
    assert rows["q_proj"]["effective_rank"] == 0 and "similarity_top1" not in rows["q_proj"]
    v_proj = loaded.base_model.model.model.layers[0].self_attn.v_proj
    expected = torch.linalg.svdvals(v_proj.get_delta_weight("default").double())[:3]
    assert rows["v_proj"]["r"] == 3
    assert rows["v_proj"]["singular_values"] == pytest.approx(expected.tolist(), rel=1e-5)
    assert rows["v_proj"]["similarity_full"] == pytest.approx(1.0, abs=1e-9)  # itself
    assert "κ_top1" in ra.format_table(result)

    patched = peft.PeftModel.from_pretrained(base_model(), tmp_path / "a")
    report = lora_kernels.patch_peft_model(patched)
    assert report.num_swapped == 2
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    q_proj = patched.base_model.model.model.layers[0].self_attn.q_proj
    assert lora_kernels.integrations.peft.fallback_reason(q_proj, torch.randn(2, 32)) == "adapter of rank 0"
    with torch.no_grad():
        assert_close(patched(input_ids=ids).logits, loaded(input_ids=ids).logits, 1e-5, "logits")


def test_similarity_and_projection_stop_at_the_numerical_rank():
    """Singular vectors of zero singular values are an arbitrary completion: no similarity or
    projection is reported from them (a fresh PEFT adapter has B = 0: ΔW = 0)."""
    A, B = _adapter(30, 20, 6, seed=5)
    zero = ra.delta_svd(A, torch.zeros_like(B))
    assert zero.rank == 0 and zero.S.tolist() == [0.0] * 6
    assert ra.similarity_grid(zero, zero).shape == (0, 0)
    with pytest.raises(ValueError, match=r"i must be an int in \[1, 0\]"):
        ra.subspace_similarity(zero, zero, 1, 1)
    deficient_A = A.clone()
    deficient_A[4:] = deficient_A[:2]  # ΔW of rank 4
    deficient, full = ra.delta_svd(deficient_A, B), ra.delta_svd(A, B)
    assert deficient.rank == 4 and full.rank == 6
    assert ra.similarity_grid(deficient, full).shape == (4, 6)
    with pytest.raises(ValueError, match="k must be an int in"):
        ra.base_projection(torch.randn(30, 20), deficient, 5)
    empty = ra.delta_svd(torch.zeros(0, 20), torch.zeros(30, 0))
    assert empty.S.numel() == 0 and empty.rank == 0 and empty.U.shape == (30, 0) and empty.effective_rank() == 0


def test_analyze_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    _saved_adapter(tmp_path, "a", 0, r=4, lora_alpha=8, target_modules=["q_proj"])
    good = str(tmp_path / "a")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text("{oops")
    (tmp_path / "file").write_text("x")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    tensors = safetensors.torch.load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    configs = {"config_list": [config], "bad_regex": {**config, "alpha_pattern": {"q_proj(": 2}},
               "alpha_null": {**config, "lora_alpha": None}, "rank0": config}
    for name, cfg in configs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(cfg))
        safetensors.torch.save_file({k: (t[:0] if ".lora_A" in k else t[:, :0]) if name == "rank0" else t
                                     for k, t in tensors.items()}, str(tmp_path / name / "adapter_model.safetensors"))
    cases = {(str(corrupt),): "is not a readable .safetensors file",
             (str(bad_json),): "adapter_config.json is not valid JSON",
             (good, "--compare", str(tmp_path / "missing")): "compare_dir must be a PEFT adapter folder",
             (good, "--base", str(tmp_path / "file")): "is not a readable weights file",
             (good, "--out", str(tmp_path / "file")): "File exists",
             (good, "--top", "0"): "top must be a positive int",
             (str(tmp_path / "config_list"),): "must hold a JSON object",
             (str(tmp_path / "bad_regex"),): "is not a valid regular expression",
             (str(tmp_path / "alpha_null"),): "lora_alpha (or its alpha_pattern entry)",
             (str(tmp_path / "rank0"),): "has rank 0"}
    for args, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            cli(["analyze", *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)


def test_analyze_notes_what_it_cannot_compare(tmp_path, capsys):
    _saved_adapter(tmp_path, "a", 0, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    _saved_adapter(tmp_path, "b", 1, r=4, lora_alpha=8, target_modules=["q_proj"])
    cli(["analyze", str(tmp_path / "a"), "--compare", str(tmp_path / "b")])
    err = capsys.readouterr().err
    result = ra.analyze_adapter(tmp_path / "a", compare_dir=tmp_path / "b")
    assert "v_proj: not in the compared adapter" in err
    rows = {row["layer"].rsplit(".", 1)[-1]: row for row in result["rows"]}
    assert "similarity_top1" in rows["q_proj"] and "similarity_top1" not in rows["v_proj"]
    assert result["notes"] == [line.removeprefix("note: ") for line in err.strip().splitlines()]
