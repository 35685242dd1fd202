"""Fast checks of the memory tool: saved-activation accounting on a tiny shape."""
import json

from lora_kernels.tools import memory

M, K, N, R = 33, 40, 24, 4
F32 = 4


def test_memory_saved_activations(tmp_path):
    res = memory.run(shapes=[(M, K, N, R)], device="cpu", dtype="fp32", dropouts=(0.0, 0.1),
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
