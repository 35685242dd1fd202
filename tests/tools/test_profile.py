"""profile_memory: exact per-module attribution of saved tensors on hand-built modules (expected bytes
derived from what each op saves for backward), parameter exclusion, storage de-duplication, hook
clean-up (also after an exception), loss selection and argument checks."""
import pytest
import torch
from torch import nn

import lora_kernels
from lora_kernels.tools.profile import OUTSIDE, MemoryProfile, profile_memory

B, K, H = 5, 8, 16
F32 = 4


class Square(nn.Module):
    def forward(self, h):
        return h * h  # mul saves h twice (self and other): one storage


class Sin(nn.Module):
    def forward(self, h):
        return torch.sin(h)  # sin saves its input


class SliceSin(nn.Module):
    def forward(self, h):
        return torch.sin(h[:, :4])  # saves a view: costs the whole storage it pins


class Net(nn.Module):
    """lin saves x (for its weight's gradient); sq saves h; sin saves h again (already counted);
    the model itself saves s (for w's gradient) and w and the buffer (parameters: excluded)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(K, H)
        self.sq = Square()
        self.sin = Sin()
        self.w = nn.Parameter(torch.randn(H))
        self.register_buffer("scale", torch.full((H,), 0.5))

    def forward(self, x):
        h = self.lin(x)
        s = self.sq(h) + self.sin(h)
        return s * self.w * self.scale


class Boom(nn.Module):
    def forward(self, h):
        raise RuntimeError("boom")


def _bytes(profile: MemoryProfile) -> dict:
    return {m.name: (m.saved_bytes, m.saved_count) for m in profile.per_module}


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_sequential_attribution_matches_what_autograd_saves():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, H), nn.ReLU(), nn.Linear(H, 4))
    x = torch.randn(B, K)
    prof = profile_memory(model, x)
    # Ground truth from the graph itself: the last addmm saved ReLU's output as mat1, ReLU saved its
    # result, the first addmm saved x. ReLU's output is one storage saved twice: counted once, for
    # ReLU (the first to save it); the weights (saved as transposed views) are parameters.
    y = model(x)
    saved_by_last = y.grad_fn._saved_mat1
    relu_out = y.grad_fn.next_functions[1][0]._saved_result
    assert saved_by_last.untyped_storage().data_ptr() == relu_out.untyped_storage().data_ptr()
    assert _bytes(prof) == {"0": (B * K * F32, 1), "1": (B * H * F32, 1)}
    assert prof.total_saved_bytes == B * K * F32 + B * H * F32 and prof.saved_count == 2
    assert prof.peak_bytes is None and prof.baseline_bytes is None and prof.peak_increase_bytes is None
    assert prof.loss_source == "sum of the output"
    assert prof.loss == pytest.approx(float(y.detach().sum()), rel=1e-5)
    assert _no_hooks(model)


def test_parameters_excluded_and_storages_deduplicated():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(B, K)
    prof = profile_memory(model, x)
    assert _bytes(prof) == {"lin": (B * K * F32, 1), "sq": (B * H * F32, 1), "": (B * H * F32, 1)}
    assert [m.module_class for m in prof.per_module] == ["Linear", "Square", "Net"]
    # A dict batch is passed as keyword arguments: same profile.
    assert _bytes(profile_memory(model, {"x": x})) == _bytes(prof)
    # Gradients flowed to every parameter (one real training backward).
    assert all(p.grad is not None for p in model.parameters())


def test_saved_view_costs_its_whole_storage():
    model = nn.Sequential(nn.Linear(K, H), SliceSin())
    prof = profile_memory(model, torch.randn(B, K))
    assert _bytes(prof) == {"0": (B * K * F32, 1), "1": (B * H * F32, 1)}


def test_input_that_needs_grad_and_frozen_weights():
    # Frozen weight, x requiring grad: addmm saves nothing (dX needs only the weight).
    model = nn.Sequential(nn.Linear(K, H), nn.Tanh())
    model[0].requires_grad_(False)
    x = torch.randn(B, K, requires_grad=True)
    prof = profile_memory(model, x)
    assert _bytes(prof) == {"1": (B * H * F32, 1)}  # tanh saves its result
    assert x.grad is not None


def test_optimizer_step_runs_inside_the_profile():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, H), nn.ReLU(), nn.Linear(H, 4))
    before = model[0].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    prof = profile_memory(model, torch.randn(B, K), step=opt)
    assert not torch.equal(before, model[0].weight.detach())
    assert prof.total_saved_bytes == B * K * F32 + B * H * F32


class WithLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(K, H)

    def forward(self, x, labels=None):
        logits = self.lin(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.mse_loss(logits, labels)
        return out


def test_loss_selection():
    torch.manual_seed(0)
    model = WithLoss()
    x, labels = torch.randn(B, K), torch.randn(B, H)
    with_loss = profile_memory(model, {"x": x, "labels": labels})
    assert with_loss.loss_source == "out.loss"
    with torch.no_grad():
        assert with_loss.loss == pytest.approx(float(model(x, labels)["loss"]), rel=1e-6)
    # mse_loss saves logits and labels: labels is an input, logits the Linear's output.
    assert _bytes(with_loss) == {"lin": (B * K * F32, 1), "": (2 * B * H * F32, 2)}
    without = profile_memory(model, {"x": x})
    assert without.loss_source == "sum of out.logits"
    assert _bytes(without) == {"lin": (B * K * F32, 1)}

    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(K, H)

        def forward(self, x):
            y = self.lin(x)
            return y, y.detach()

    assert profile_memory(TupleOut(), x).loss_source == "sum of out[0]"


def test_to_dict_and_table():
    model = nn.Sequential(nn.Linear(K, H))
    prof = profile_memory(model, torch.randn(B, K))
    assert OUTSIDE not in _bytes(prof)  # the loss sum saves nothing
    text = prof.table(top=1)
    assert "saved activations" in text and "Linear" in text
    d = prof.to_dict()
    assert d["total_saved_bytes"] == prof.total_saved_bytes == B * K * F32
    assert d["per_module"] == [{"name": "0", "module_class": "Linear", "saved_bytes": B * K * F32,
                                "saved_count": 1}]
    assert d["peak_bytes"] is None and d["peak_increase_bytes"] is None


def test_hooks_removed_after_an_exception():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, H), nn.Sequential(nn.ReLU(), Boom()))
    with pytest.raises(RuntimeError, match="boom"):
        profile_memory(model, torch.randn(B, K))
    assert _no_hooks(model)
    # Nothing stale: the same modules profile exactly afterwards (stack and pack hook gone).
    model[1][1] = nn.Identity()
    assert _bytes(profile_memory(model, torch.randn(B, K))) == {"0": (B * K * F32, 1), "1.0": (B * H * F32, 1)}
    assert _no_hooks(model)
    # A normal forward after the profile saves its tensors as usual (no pack hook left installed).
    y = model(torch.randn(B, K))
    assert y.grad_fn is not None


class _DictOutput(nn.Linear):
    def __init__(self):
        super().__init__(K, H)

    def forward(self, x):
        return {"loss": None, "logits": None}


def test_bad_arguments():
    model = nn.Linear(K, H)
    x = torch.randn(B, K)
    with pytest.raises(TypeError, match="model"):
        profile_memory(lambda t: t, x)
    with pytest.raises(TypeError, match="batch"):
        profile_memory(model, [x])
    with pytest.raises(TypeError, match="batch keys"):
        profile_memory(model, {0: x})
    with pytest.raises(TypeError, match="step"):
        profile_memory(model, x, step="adam")
    frozen = nn.Linear(K, H).requires_grad_(False)
    with pytest.raises(ValueError, match="does not require grad"):
        profile_memory(frozen, x)
    assert _no_hooks(frozen)
    with pytest.raises(TypeError, match="loss"):
        profile_memory(nn.Identity(), x.long())
    with pytest.raises(TypeError, match="no floating-point loss"):  # a dict output holding no tensor
        profile_memory(_DictOutput(), x)
    with pytest.raises(ValueError, match="top"):
        profile_memory(model, x).table(top=-1)


def test_lazy_export():
    assert "profile_memory" in lora_kernels.__all__
    assert lora_kernels.profile_memory is profile_memory
    with pytest.raises(AttributeError):
        lora_kernels.no_such_name  # noqa: B018


def test_a_patched_peft_model_is_profiled_on_the_fast_path():
    """The profile's module hooks skip the base layers of patched LoRA layers: a hook there would
    (rightly) send the layer to PEFT's path, and the profile would measure PEFT instead."""
    peft = pytest.importorskip("peft")
    from tests.helpers import use_backend

    torch.manual_seed(0)
    model = peft.get_peft_model(nn.Sequential(nn.Linear(K, H), nn.ReLU(), nn.Linear(H, K)),
                                peft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    lora_kernels.patch_peft_model(model)
    with use_backend("torch") as record:
        profile = profile_memory(model, torch.randn(B, K))
    assert len(record.impls("fwd")) == 2 and profile.total_saved_bytes > 0
    assert _no_hooks(model)
