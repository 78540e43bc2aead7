"""Learning-rate schedule, parameter groups, 8-bit AdamW state, and the EMA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stages.common.ema import EMA, EMAConfig, ema_decay
from stages.common.optim import OptimConfig, lr_at, make_optimizer, param_groups


def test_lr_warmup_then_cosine_reaches_its_endpoints():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    warm = [lr_at(s, cfg, 110) for s in range(10)]
    assert warm[0] == pytest.approx(1e-4) and warm[-1] == pytest.approx(1e-3)
    assert all(b > a for a, b in zip(warm, warm[1:]))  # linear ramp, first update moves
    assert lr_at(10, cfg, 110) == pytest.approx(1e-3)  # the peak right after warm-up
    assert lr_at(60, cfg, 110) == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway: cos(pi/2) = 0
    assert lr_at(110, cfg, 110) == pytest.approx(1e-4)  # lr * min_lr_ratio at max_steps
    assert lr_at(500, cfg, 110) == pytest.approx(1e-4)  # stays there past the end
    decay = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(b <= a for a, b in zip(decay, decay[1:]))


def test_lr_constant_and_no_warmup():
    cfg = OptimConfig(lr=2e-4, warmup_steps=0, schedule="constant")
    assert {lr_at(s, cfg, 100) for s in (0, 1, 50, 100)} == {2e-4}
    cos = OptimConfig(lr=2e-4, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0)
    assert lr_at(0, cos, 100) == pytest.approx(2e-4)
    assert lr_at(25, cos, 100) == pytest.approx(1e-4 * (1 + math.cos(math.pi / 4)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.pos_embed = nn.Parameter(torch.zeros(4, 8))
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.GroupNorm(2, 8)
        self.ln = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8).requires_grad_(False)


def test_param_groups_decay_only_weights_of_linear_and_conv():
    net = Net()
    net.tied = nn.Linear(8, 10, bias=False)
    net.tied.weight = net.embed.weight  # tied to the embedding: placed once
    groups = {g["name"]: g for g in param_groups({"net": net}, weight_decay=0.05)}
    decayed = {id(p) for p in groups["decay"]["params"]}
    assert decayed == {id(net.conv.weight), id(net.proj.weight)}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    no_decay = groups["no_decay"]["params"]
    assert len(no_decay) == len({id(p) for p in no_decay})  # the tied weight appears once
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert decayed | {id(p) for p in no_decay} == trainable  # frozen ones left out


def test_adamw8bit_keeps_8bit_state_on_big_layers_and_fp32_on_small():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4))  # 4096-element weight: 8-bit
    opt = make_optimizer({"net": net}, OptimConfig(name="adamw8bit", lr=1e-3))
    before = [p.detach().clone() for p in net.parameters()]
    net(torch.randn(8, 64)).square().mean().backward()
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
    state = opt.state_dict()["state"]
    states = {
        tuple(p.shape): state[i]["__bnb_optimizer_quant_state__"]
        for i, p in enumerate(p for g in opt.param_groups for p in g["params"])
    }
    assert states[(64, 64)]["state1"].dtype == torch.uint8
    assert states[(64, 64)]["state2"].dtype == torch.uint8
    assert states[(4, 64)]["state1"].dtype == torch.float32  # 256 elements: below min_8bit_size


def test_ema_warmup_decay_update_and_state_round_trip():
    cfg = EMAConfig(decay=0.9, warmup_power=1.0)
    assert ema_decay(0, cfg) == 0.0  # the first update copies
    assert ema_decay(1, cfg) == pytest.approx(0.5)
    assert ema_decay(100, cfg) == 0.9  # capped by the ceiling
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = EMA({"net": net}, cfg)
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[1].num_batches_tracked.fill_(7)
    ema.update({"net": net})  # t=0: copy
    assert torch.equal(ema.modules["net"][0].weight, net[0].weight)
    assert int(ema.modules["net"][1].num_batches_tracked) == 7
    with torch.no_grad():
        net[0].weight.fill_(3.0)
    ema.update({"net": net})  # t=1: decay 0.5 -> halfway
    assert torch.allclose(ema.modules["net"][0].weight, torch.full((3, 3), 2.0))
    assert not ema.modules["net"][0].weight.requires_grad and not ema.modules["net"].training

    assert torch.equal(net[0].weight, torch.full((3, 3), 3.0))  # the model keeps its own

    restored = EMA({"net": nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))}, cfg)
    restored.load_state_dict(ema.state_dict())
    assert restored.step == 2
    for a, b in zip(
        restored.modules["net"].state_dict().values(), ema.modules["net"].state_dict().values()
    ):
        assert torch.equal(a, b)
    assert torch.allclose(restored.modules["net"][0].weight, torch.full((3, 3), 2.0))
