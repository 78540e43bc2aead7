"""PatchGAN discriminator (Isola et al. 2017), as in CompVis' taming-transformers.

``NLayerDiscriminator``: 4x4 convolutions, stride 2 for the first ``layers`` blocks then
stride 1, BatchNorm and LeakyReLU(0.2); one logit per overlapping patch, (B,1,h',w').
Weights are initialised N(0, 0.02) (BatchNorm scales N(1, 0.02)) as in pix2pix.
"""

from __future__ import annotations

from torch import nn


class NLayerDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        seq: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [
                nn.Conv2d(
                    channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False
                ),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2),
            ]
        seq.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*seq)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x):  # (B,3,H,W) -> patch logits (B,1,h',w')
        return self.main(x)
