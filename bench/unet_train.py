"""UNet training step: forward + backward + AdamW update, ours vs diffusers at equal config.

Ours is the training path of the stage: ``make_objective(ObjectiveConfig()).loss``, the default
flow objective (logit-normal t, condition dropout to the null condition,
x_t = (1 - t) x0 + t noise, MSE to v = noise - x0), and the shared trainer's optimiser
(``make_optimizer``: fused AdamW where the device has it). The peer does the same maths the
way diffusers' training scripts do (``UNet2DConditionModel`` called with t * 1000,
``class_labels`` = pooled text, the padding mask as ``encoder_attention_mask``) with their
optimiser, ``torch.optim.AdamW`` at its defaults (the per-tensor loop on CPU, foreach on
CUDA). fp32 on CPU; bf16 autocast on a GPU.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from stages.common.optim import OptimConfig, make_optimizer
from stages.unet.objectives import ObjectiveConfig, make_objective

from . import models
from .flops import train_step_flops
from .harness import Case, Settings, Workload

OPTIM = OptimConfig(lr=1e-4, weight_decay=0.01)


def autocast(device: str, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(torch.device(device).type, dtype=dtype)


def inputs(cfg: Any, batch: int, context_length: int, device: str, seed: int = 0):
    """Normalised latents x0 (B,C,h,w), a text condition and the null condition."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    cond = models.random_condition(batch, context_length, cfg.context_dim, seed)
    null = models.random_condition(1, context_length, cfg.context_dim, seed + 1)
    return x0.to(device), cond.to(device), null.to(device)


def build(
    impl: str,
    cfg: Any,
    batch: int,
    context_length: int,
    device: str,
    precision: str = "fp32",
    compile: bool = False,
) -> Workload:
    """One training step of ``impl`` on fixed inputs (fresh noise and t each call)."""
    torch.manual_seed(0)
    x0, cond, null = inputs(cfg, batch, context_length, device)
    objective = make_objective(ObjectiveConfig())
    if impl == "ours":
        model = models.our_unet(cfg).place(device).train()
        optimizer = make_optimizer({"unet": model}, OPTIM)
        model = torch.compile(model) if compile else model

        def loss() -> torch.Tensor:
            return objective.loss(model, x0, cond, null)["loss"]

    else:
        peer = models.peer_unet(cfg).to(device).train()
        optimizer = torch.optim.AdamW(
            peer.parameters(), lr=OPTIM.lr, betas=OPTIM.betas, weight_decay=OPTIM.weight_decay
        )
        peer = torch.compile(peer) if compile else peer

        def loss() -> torch.Tensor:
            c, _ = objective.drop_condition(cond, null)
            t = objective.sample_u(batch, x0.device)
            noise = torch.randn_like(x0)
            s = t.view(-1, 1, 1, 1)
            x_t = (1 - s) * x0 + s * noise
            v = peer(
                x_t,
                t * cfg.time_scale,
                encoder_hidden_states=c.tokens,
                class_labels=c.pooled,
                encoder_attention_mask=c.mask,
            ).sample
            return F.mse_loss(v.float(), (noise - x0).float())

    def step() -> None:
        with autocast(device, precision):
            value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make(impl: str, params: dict[str, Any], device: str) -> Workload:
    cfg = models.unet_config(params["side"], params["preset"])
    context = models.clip_config(params["preset"]).text.context_length
    return build(
        impl,
        cfg,
        params["batch"],
        context,
        device,
        params["precision"],
        params.get("compile", False),
    )


def cases(settings: Settings) -> list[Case]:
    preset = "tiny" if settings.quick else models.PRESET
    sides = (8,) if settings.quick else (32, 64)  # 256 and 512 px through the f8 VAE
    batch = 1 if not settings.cuda else 8
    precision = "bf16" if settings.cuda else "fp32"
    out = []
    for side in sides:
        params = {"preset": preset, "side": side, "batch": batch, "precision": precision}
        px = side * models.vae_config(preset).factor
        cfg = models.unet_config(side, preset)
        context = models.clip_config(preset).text.context_length
        out.append(
            Case(
                "unet_train",
                f"unet train step {px} px b{batch} {precision}",
                params,
                lambda impl, p=params: make(impl, p, settings.device),
                # The warm-up step is needed: AdamW allocates its moments in the first one.
                # Not "heavy" at 512 px either: two repetitions left that row unreadable.
                **settings.plan(warmup=True),
                flops=train_step_flops("ours", cfg, batch, context),
            )
        )
    return out
