"""Generic LoRA injection: zero initial delta, scale semantics, Conv1d/Linear, state dict round trip."""

import pytest
import torch
from torch import nn

from pcm_policy.model.lora import (
    LoRAConv1d, LoRALinear, add_lora, load_lora_state_dict, lora_parameters, lora_scale, lora_state_dict,
    scaled_denoiser, set_lora_scale,
)



class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(3, 5, kernel_size=3, stride=1, padding=1)
        self.block = nn.Sequential(nn.Conv1d(5, 4, 5, padding=2, dilation=1), nn.GroupNorm(2, 4), nn.Mish())
        self.head = nn.Linear(4 * 8, 6)

    def forward(self, x):
        return self.head(self.block(self.conv(x)).flatten(1))


def _randomise(m):
    with torch.no_grad():
        for p in lora_parameters(m):
            p.copy_(torch.randn_like(p) * 0.3)


def test_injection_and_zero_init():
    net = Net()
    x = torch.randn(2, 3, 8)
    ref = net(x)
    add_lora(net, rank=2)
    assert isinstance(net.conv, LoRAConv1d) and isinstance(net.block[0], LoRAConv1d) and isinstance(net.head, LoRALinear)
    torch.testing.assert_close(net(x), ref)  # B is zero-initialised
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora_parameters(net)} and len(trainable) == 6
    assert net.conv.lora_A.kernel_size == (3,) and net.conv.lora_B.kernel_size == (1,)


def test_scale_semantics_and_context_manager():
    net = Net()
    x = torch.randn(2, 3, 8)
    ref = net(x)
    add_lora(net, rank=3, alpha=6.0)
    _randomise(net)
    full = net(x)
    assert not torch.allclose(full, ref)
    with lora_scale(net, 0.0):
        assert torch.equal(net(x), ref)  # scale 0 skips the delta: bit-identical to the base
    assert torch.equal(net(x), full)  # restored
    # linear in the scale for a single LoRA layer
    lin = add_lora(nn.Linear(4, 3), rank=2)
    _randomise(lin)
    z = torch.randn(5, 4)
    set_lora_scale(lin, 0.0); y0 = lin(z)
    set_lora_scale(lin, 1.0); y1 = lin(z)
    set_lora_scale(lin, 0.25); yq = lin(z)
    torch.testing.assert_close(yq, y0 + 0.25 * (y1 - y0))


def test_targets_filter_and_gradients():
    net = add_lora(Net(), rank=2, targets=(nn.Linear,))
    assert isinstance(net.conv, nn.Conv1d) and isinstance(net.head, LoRALinear)
    _randomise(net)
    net(torch.randn(2, 3, 8)).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(net))
    assert net.conv.weight.grad is None


def test_state_dict_round_trip():
    a = add_lora(Net(), rank=2)
    _randomise(a)
    sd = lora_state_dict(a)
    assert sd and all("lora_" in k for k in sd)
    b = add_lora(Net(), rank=2)
    load_lora_state_dict(b, sd)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(a(x), b(x))
    with pytest.raises(KeyError):
        load_lora_state_dict(b, {k: v for k, v in list(sd.items())[1:]})


def test_scaled_denoiser_adapter():
    class D(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(2, 2)

        def forward(self, x, t, cond):
            return self.l(x)

    d = add_lora(D(), rank=1)
    _randomise(d)
    fn = scaled_denoiser(d)
    x = torch.randn(3, 4, 2)
    with lora_scale(d, 0.0):
        base = d(x, None, None)
    assert torch.equal(fn(x, None, None, 0.0), base)
    assert not torch.allclose(fn(x, None, None, 1.0), base)
