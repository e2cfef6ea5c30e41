"""Mixed precision: fp32 masters, loss scaling with skips, and the no-copy fp32 path."""

import pytest
import torch
from torch import nn

from mllm_cl.precision import MixedPrecision, resolve_dtype


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 1)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.register_buffer("table", torch.linspace(0, 1, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.inp.weight.dtype)
        return self.out(self.norm(torch.tanh(self.inp(self.frozen(x))))).float()


def _data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    return x, x[:, :1] * 2 - x[:, 1:2]


def _train(model: nn.Module, mp: MixedPrecision, steps: int, lr: float = 1e-2) -> None:
    x, y = _data()
    opt = torch.optim.AdamW(mp.master_params(), lr=lr)
    for _ in range(steps):
        mp.backward(((model(x) - y) ** 2).mean())
        mp.step(opt, max_grad_norm=1.0)


def test_fp32_path_is_a_plain_optimizer_loop_bit_for_bit() -> None:
    torch.manual_seed(0)
    plain, mixed = TinyNet(), TinyNet()
    mixed.load_state_dict(plain.state_dict())
    x, y = _data()
    params = [p for p in plain.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(5):
        ((plain(x) - y) ** 2).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
    mp = MixedPrecision(mixed, torch.float32)
    assert all(m is p for m, (_, p) in zip(mp.master_params(), mp.params))  # no copies
    _train(mixed, mp, 5)
    for (name, a), b in zip(plain.state_dict().items(), mixed.state_dict().values()):
        assert torch.equal(a, b), name


def _backward_and_reference(dtype: torch.dtype, **precision_kw) -> tuple[MixedPrecision, list[torch.Tensor], float]:
    """MixedPrecision after one large backward, and fp32 copies of its masters whose grads are the unscaled, clipped
    (max norm 1) fp32 copies of its grads: what a correct step hands the optimizer."""
    torch.manual_seed(0)
    model = TinyNet()
    mp = MixedPrecision(model, dtype, **precision_kw)
    x, y = _data()
    mp.backward(((model(x) - y) ** 2).mean() * 50)  # large enough that clipping at 1.0 acts
    grads = [p.grad.float() / mp.scale for _, p in mp.params]  # exact: bf16/fp16 values are fp32 values
    norm = torch.cat([g.flatten() for g in grads]).double().norm().item()
    assert norm > 1.0
    reference = [m.detach().clone().requires_grad_() for m in mp.master_params()]
    for r, g in zip(reference, grads):
        r.grad = g * (1.0 / (norm + 1e-6))
    return mp, reference, norm


def test_bf16_step_is_an_optimizer_step_on_the_clipped_fp32_copies_of_the_grads() -> None:
    mp, reference, norm = _backward_and_reference(torch.bfloat16)
    torch.optim.SGD(reference, lr=0.1).step()  # SGD: unlike Adam, the update shows any error in the clip
    result = mp.step(torch.optim.SGD(mp.master_params(), lr=0.1), max_grad_norm=1.0)
    assert result.taken and result.grad_norm == pytest.approx(norm, rel=1e-6)
    for (name, p), m, r in zip(mp.params, mp.master_params(), reference):
        torch.testing.assert_close(m, r.detach(), rtol=1e-6, atol=1e-7, msg=name)
        assert p.dtype == torch.bfloat16 and torch.equal(p, m.to(torch.bfloat16)), name
        assert p.grad is None and m.grad is None, name


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_step_with_the_coefficient_inside_the_fused_kernel(fused: bool) -> None:
    """A fused AdamW takes the clip/unscale coefficient through `grad_scale` (no pass of its own); the
    foreach AdamW gets it multiplied in first. Both equal AdamW on the clipped fp32 copies."""
    mp, reference, _ = _backward_and_reference(torch.float16, loss_scale=8.0)  # unscaling and clipping both act
    # eps = 1 makes Adam's update depend on the gradient's scale (it cancels out when eps << |grad|)
    torch.optim.AdamW(reference, lr=1e-2, eps=1.0, foreach=False).step()
    optimizer = torch.optim.AdamW(mp.master_params(), lr=1e-2, eps=1.0, fused=fused, foreach=not fused)
    assert getattr(optimizer, "_step_supports_amp_scaling", False) == fused
    assert mp.step(optimizer, max_grad_norm=1.0).taken
    assert not hasattr(optimizer, "grad_scale")
    for (name, _), m, r in zip(mp.params, mp.master_params(), reference):
        torch.testing.assert_close(m, r.detach(), rtol=1e-6, atol=1e-7, msg=name)


def test_masters_stay_fp32_and_frozen_params_have_none() -> None:
    model = TinyNet()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    mp = MixedPrecision(model, torch.bfloat16)
    assert model.inp.weight.dtype == torch.bfloat16 and model.frozen.weight.dtype == torch.bfloat16
    assert model.table.dtype == torch.float32  # buffers keep their dtype
    names = [name for name, _ in mp.named_master_params()]
    assert names == ["inp.weight", "inp.bias", "norm.weight", "norm.bias", "out.weight", "out.bias"]
    for name, master in mp.named_master_params():
        assert master.dtype == torch.float32
        assert torch.equal(master, reference[name])  # taken before rounding to bf16
    _train(model, mp, 3)
    for name, master in mp.named_master_params():
        assert master.dtype == torch.float32
        assert torch.equal(master.to(torch.bfloat16), model.get_parameter(name))


def test_bf16_tracks_fp32() -> None:
    torch.manual_seed(0)
    full, half = TinyNet(), TinyNet()
    half.load_state_dict(full.state_dict())
    _train(full, MixedPrecision(full, torch.float32), 8)
    mp = MixedPrecision(half, torch.bfloat16)
    _train(half, mp, 8)
    for name, master in mp.named_master_params():
        reference = full.get_parameter(name)
        assert (master - reference).abs().max() < 0.02 * reference.abs().max() + 2e-3, name


def test_fp32_masters_keep_updates_that_bf16_rounds_away() -> None:
    model = nn.Linear(1, 1, bias=False)
    nn.init.ones_(model.weight)
    mp = MixedPrecision(model, torch.bfloat16)
    opt = torch.optim.SGD(mp.master_params(), lr=1e-4)  # each update (1e-4) is below bf16's step at 1.0 (2^-7)
    for _ in range(100):
        mp.backward(model(torch.ones(1, 1, dtype=torch.bfloat16)).sum())  # d/dw = 1
        mp.step(opt, max_grad_norm=None)
    master = mp.master_params()[0]
    assert torch.allclose(master, torch.tensor([[0.99]]), atol=1e-5)
    assert model.weight.item() < 1.0  # the accumulated change reached the bf16 weight
    naive = torch.ones((), dtype=torch.bfloat16)
    for _ in range(100):
        naive -= 1e-4
    assert naive.item() == 1.0  # without masters the same updates are lost


def test_fp16_loss_scaling_rescues_underflowing_gradients() -> None:
    x = torch.full((4, 1), 1e-5)
    grads = {}
    for loss_scale in (None, "dynamic"):
        model = nn.Linear(1, 1, bias=False)
        mp = MixedPrecision(model, torch.float16, loss_scale=loss_scale)
        mp.backward(model(x.half()).float().sum() * 1e-4)  # true grad 4e-9: below fp16's smallest subnormal
        grads[loss_scale] = model.weight.grad.float().clone()
    assert grads[None].abs().max() == 0
    assert torch.allclose(grads["dynamic"] / 2 ** 16, torch.tensor([[4e-9]]), rtol=0.01)


def test_fp16_scaler_skips_inf_steps_halves_and_grows() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    mp = MixedPrecision(model, torch.float16, growth_interval=2)
    assert mp.dynamic and mp.scale == 2 ** 16
    opt = torch.optim.AdamW(mp.master_params(), lr=1e-2)
    x, y = _data()
    before = {name: m.clone() for name, m in mp.named_master_params()}
    weights_before = model.inp.weight.clone()

    mp.backward(((model(x) - y) ** 2).mean())
    model.inp.weight.grad[0, 0] = float("inf")
    result = mp.step(opt, max_grad_norm=1.0)
    assert not result.taken and result.scale == 2 ** 16
    assert mp.scale == 2 ** 15 and mp.skipped_steps == 1
    assert all(torch.equal(m, before[name]) for name, m in mp.named_master_params())
    assert torch.equal(model.inp.weight, weights_before) and not opt.state  # nothing moved, no state
    assert all(p.grad is None for p in model.parameters())

    for expected_scale in (2 ** 15, 2 ** 15):
        mp.backward(((model(x) - y) ** 2).mean())
        result = mp.step(opt, max_grad_norm=1.0)
        assert result.taken and result.scale == expected_scale and torch.isfinite(torch.tensor(result.grad_norm))
    assert mp.scale == 2 ** 16  # doubled after growth_interval=2 clean steps
    assert not torch.equal(model.inp.weight, weights_before)
    assert all(m.dtype == torch.float32 for m in mp.master_params())


def test_grad_norm_is_that_of_the_unscaled_fp32_gradients() -> None:
    torch.manual_seed(0)
    reference, model = TinyNet(), TinyNet()
    model.load_state_dict(reference.state_dict())
    x, y = _data()
    ((reference(x) - y) ** 2).mean().backward()
    expected = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in reference.parameters() if p.grad is not None))
    mp = MixedPrecision(model, torch.float16, loss_scale=1024.0)
    mp.backward(((model(x) - y) ** 2).mean())
    result = mp.step(torch.optim.SGD(mp.master_params(), lr=0.0), max_grad_norm=1e9)
    assert result.taken and result.scale == 1024.0 and mp.scale == 1024.0  # a static scale never moves
    assert abs(result.grad_norm - expected.item()) < 5e-3 * expected.item()


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    mp = MixedPrecision(model, torch.float16, growth_interval=3)
    _train(model, mp, 2)
    state = mp.state_dict()
    other_model = TinyNet()
    other = MixedPrecision(other_model, torch.float16, growth_interval=3)
    other.load_state_dict(state)
    assert other.state_dict()["scaler"] == mp.state_dict()["scaler"]
    for (name, a), (_, b) in zip(mp.named_master_params(), other.named_master_params()):
        assert torch.equal(a, b) and torch.equal(model.get_parameter(name), other_model.get_parameter(name))
    with pytest.raises(ValueError, match="same precision"):
        MixedPrecision(TinyNet(), torch.bfloat16).load_state_dict(state)


def test_loads_the_scaler_state_that_earlier_checkpoints_hold() -> None:
    saved = {"dtype": "float16", "dynamic": True, "scale": 1024.0, "growth_interval": 3, "clean_steps": 2,
             "skipped_steps": 5}  # a trainer checkpoint's state["scaler"], as written from the start
    mp = MixedPrecision(TinyNet(), torch.float16, growth_interval=3)
    mp.load_state_dict({"masters": mp.state_dict()["masters"], "scaler": dict(saved)})
    assert mp.scale == 1024.0 and mp.skipped_steps == 5 and mp.dynamic
    assert mp.state_dict()["scaler"] == saved and list(mp.state_dict()["scaler"]) == list(saved)


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("fp16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="precision must be"):
        resolve_dtype("half", "cpu")
