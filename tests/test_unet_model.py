"""The UNet network: output shape and zero-initialised output, memory layout (NCHW on
CPU, channels-last on CUDA, a storage choice only), the padding mask and the text it reads,
and gradient checkpointing."""

from __future__ import annotations

import pytest
import torch

from stages.clip.export import TextCondition
from stages.unet.model import SpatialTransformer, UNet, UNetModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet_config(**kw) -> UNetModelConfig:
    base = dict(
        in_channels=4,
        context_dim=16,
        sample_size=8,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8, 4),
        head_dim=8,
        groups=8,
    )
    return UNetModelConfig(**{**base, **kw})


def randomise_zero_inits(model: torch.nn.Module) -> None:
    """Zero-initialised output layers hide everything: give them values for the test."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def text(batch: int, length: int = 6, width: int = 16, real: int = 3) -> TextCondition:
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, :real] = True
    tokens = torch.randn(batch, length, width)
    return TextCondition(tokens, mask, tokens[:, real - 1].clone())


def test_spatial_transformer_keeps_the_input_layout():
    """The token view it returns has channels-last strides; the residual must not switch
    a NCHW activation to channels-last (a copy per block and slower CPU kernels after it)."""
    torch.manual_seed(0)
    block = SpatialTransformer(32, tiny_unet_config())
    torch.nn.init.normal_(block.proj_out.weight)
    x, cond = torch.randn(2, 32, 4, 4), text(2)
    nchw = block(x, cond.tokens, cond.mask)
    assert nchw.is_contiguous()
    channels_last = block(x.contiguous(memory_format=torch.channels_last), cond.tokens, cond.mask)
    assert not channels_last.is_contiguous()
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(channels_last, nchw)


def test_unet_shapes_zero_output_and_device_layout():
    torch.manual_seed(0)
    model = UNet(tiny_unet_config()).place("cpu")
    x, t, cond = torch.randn(2, 4, 8, 8), torch.rand(2), text(2)
    out = model(x, t, cond)
    assert out.shape == x.shape
    assert torch.all(out == 0)  # zero-initialised output conv: the untrained net predicts v = 0
    # Channels-last is CUDA's layout; on CPU weights and activations stay NCHW.
    assert model.layout("cuda") == torch.channels_last
    assert model.layout("cpu") == torch.contiguous_format
    assert UNet(tiny_unet_config(channels_last=False)).layout("cuda") == torch.contiguous_format
    assert model.conv_out.weight.is_contiguous()
    randomise_zero_inits(model)
    out = model(x.contiguous(memory_format=torch.channels_last), t, cond)
    assert out.is_contiguous()
    # The same weights stored channels-last (as ``place("cuda")`` stores them) compute the
    # same function: layout is a storage choice only.
    stored_cl = UNet(tiny_unet_config())
    stored_cl.load_state_dict(model.state_dict())
    stored_cl.to(memory_format=torch.channels_last)
    assert stored_cl.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(stored_cl(x, t, cond), out, atol=1e-5, rtol=1e-4)
    # Three levels with attention only at 2: still the right shape.
    deeper = UNet(tiny_unet_config(channel_mult=(1, 1, 2), attention_resolutions=(2,)))
    assert deeper(x, t, cond).shape == x.shape
    with pytest.raises(ValueError, match="context_dim"):
        UNet(tiny_unet_config(context_dim=0))


def test_unet_respects_padding_mask_and_uses_the_text():
    torch.manual_seed(1)
    model = UNet(tiny_unet_config()).eval()
    randomise_zero_inits(model)
    x, t, cond = torch.randn(2, 4, 8, 8), torch.rand(2), text(2, real=3)
    out = model(x, t, cond)
    padded = cond.tokens.clone()
    padded[:, 3:] = torch.randn_like(padded[:, 3:]) * 10
    same = model(x, t, TextCondition(padded, cond.mask, cond.pooled))
    torch.testing.assert_close(same, out)
    real = cond.tokens.clone()
    real[:, 1] += 1.0
    assert not torch.allclose(model(x, t, TextCondition(real, cond.mask, cond.pooled)), out)
    other_pooled = TextCondition(cond.tokens, cond.mask, cond.pooled + 1.0)
    assert not torch.allclose(model(x, t, other_pooled), out)
    assert not torch.allclose(model(x, t * 0.5, cond), out)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(2)
    model = UNet(tiny_unet_config())
    randomise_zero_inits(model)
    ckpt = UNet(tiny_unet_config(gradient_checkpointing=True))
    ckpt.load_state_dict(model.state_dict())
    x, t, cond = torch.randn(2, 4, 8, 8), torch.rand(2), text(2)
    for m in (model, ckpt):
        m(x, t, cond).square().mean().backward()
    for (name, a), b in zip(model.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name, atol=1e-6, rtol=1e-4)
