"""3D residual U-Net backbone built from MONAI's blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.blocks import UnetResBlock, UnetUpBlock
from torch import nn

from unisegtext.models.config import BackboneConfig
from unisegtext.models.registry import register_backbone


@dataclass
class BackboneOutput:
    """Multi-scale features of one batch of patches.

    Attributes:
        levels: decoder features per level k (1/2**k resolution), level 0 first;
            levels[k]: (B, channels[k], X/2**k, Y/2**k, Z/2**k).
        voxel_embedding: (B, embed_dim, X, Y, Z) per-voxel embedding at full resolution.
        bottleneck: (B, channels[-1], ...) deepest encoder features.
    """

    levels: list[torch.Tensor]
    voxel_embedding: torch.Tensor
    bottleneck: torch.Tensor


class ResUNet(nn.Module):
    """Encoder of residual blocks (stride-2 downsampling), decoder with skip connections.

    Input (B, C, X, Y, Z) with X, Y, Z divisible by 2**(levels-1).
    """

    def __init__(self, config: BackboneConfig):
        super().__init__()
        ch = list(config.channels)
        norm = config.norm
        self.encoder = nn.ModuleList()
        for k, out_ch in enumerate(ch):
            in_ch = config.in_channels if k == 0 else ch[k - 1]
            blocks = [UnetResBlock(3, in_ch, out_ch, kernel_size=3, stride=1 if k == 0 else 2, norm_name=norm)]
            blocks += [
                UnetResBlock(3, out_ch, out_ch, kernel_size=3, stride=1, norm_name=norm)
                for _ in range(config.blocks_per_level - 1)
            ]
            self.encoder.append(nn.Sequential(*blocks))
        self.decoder = nn.ModuleList(
            UnetUpBlock(3, ch[k + 1], ch[k], kernel_size=3, stride=1, upsample_kernel_size=2, norm_name=norm)
            for k in range(len(ch) - 1)
        )
        self.embed = nn.Conv3d(ch[0], config.embed_dim, kernel_size=1)
        self.out_channels = ch

    def forward(self, image: torch.Tensor) -> BackboneOutput:
        skips = []
        x = image
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        bottleneck = x
        levels: list[torch.Tensor] = [x]
        for k in range(len(self.decoder) - 1, -1, -1):
            x = self.decoder[k](x, skips[k])
            levels.append(x)
        levels.reverse()  # level 0 = full resolution
        return BackboneOutput(levels=levels, voxel_embedding=self.embed(levels[0]), bottleneck=bottleneck)


@register_backbone("resunet")
def build_resunet(config: BackboneConfig) -> ResUNet:
    return ResUNet(config)
