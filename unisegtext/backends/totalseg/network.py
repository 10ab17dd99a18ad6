"""nnU-Net's `PlainConvUNet`, rebuilt from a `plans.json` in plain torch.

The module tree mirrors dynamic-network-architectures' (DNA) `PlainConvUNet`, so a state dict
converted from an nnU-Net checkpoint loads with ``strict=True`` once DNA's aliases are dropped
(``decoder.encoder.*`` repeats the encoder, ``*.all_modules.*`` repeats each conv block):

    encoder.stages.{s}.0.convs.{i}.conv / .norm     Conv3d -> InstanceNorm3d(affine) -> LeakyReLU
    decoder.transpconvs.{s}                          ConvTranspose3d, kernel = stride
    decoder.stages.{s}.convs.{i}.conv / .norm        on [upsampled, skip] (concatenated)
    decoder.seg_layers.{s}                           1x1x1 Conv3d; only the last one is used here

Inference only: no deep supervision (nnU-Net builds the network with
``enable_deep_supervision=False`` to predict), no dropout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from unisegtext.errors import ModelLoadError

_PLAIN_UNET = "PlainConvUNet"
_ALIAS_MARKERS = ("decoder.encoder.", ".all_modules.")


@dataclass
class UNetArchitecture:
    """Everything that rebuilds a `PlainConvUNet` (the `architecture` block of our config.json).

    Lists run over resolution stages, axes in the network's (transposed) array order.
    """

    input_channels: int
    num_classes: int
    features_per_stage: list[int]
    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    n_conv_per_stage: list[int]
    n_conv_per_stage_decoder: list[int]
    conv_bias: bool = True
    norm_eps: float = 1e-5
    norm_affine: bool = True
    negative_slope: float = 0.01

    @property
    def n_stages(self) -> int:
        return len(self.features_per_stage)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetArchitecture:
        try:
            arch = cls(**data)
        except TypeError as exc:
            raise ModelLoadError(f"architecture block of config.json is invalid ({exc})") from exc
        arch.check()
        return arch

    def check(self) -> None:
        n = self.n_stages
        lengths = {"kernel_sizes": len(self.kernel_sizes), "strides": len(self.strides),
                   "n_conv_per_stage": len(self.n_conv_per_stage)}
        if n < 2 or any(v != n for v in lengths.values()) or len(self.n_conv_per_stage_decoder) != n - 1:
            raise ModelLoadError(
                f"inconsistent U-Net plan: {n} stages in features_per_stage, {lengths}, "
                f"{len(self.n_conv_per_stage_decoder)} decoder stages (expected {n - 1})"
            )
        if any(len(k) != 3 for k in self.kernel_sizes) or any(len(s) != 3 for s in self.strides):
            raise ModelLoadError("only 3D plans are supported (kernel sizes and strides need 3 entries)")

    @classmethod
    def from_plans(cls, configuration: dict[str, Any], input_channels: int, num_classes: int) -> UNetArchitecture:
        """Read one (inheritance-resolved) plans configuration, old flat or new format.

        Old format (TotalSegmentator v2 weights): ``UNet_class_name``, ``UNet_base_num_features``,
        ``unet_max_num_features``, ``n_conv_per_stage_encoder/decoder``, ``pool_op_kernel_sizes``,
        ``conv_kernel_sizes``; features of stage i = min(base * 2**i, max), conv bias,
        InstanceNorm(eps 1e-5, affine), LeakyReLU 0.01 (nnU-Net's own reconstruction).
        New format: ``architecture = {network_class_name, arch_kwargs, _kw_requires_import}``.
        """
        if "architecture" in configuration:
            return cls._from_new_plans(configuration["architecture"], input_channels, num_classes)
        name = configuration.get("UNet_class_name")
        if name != _PLAIN_UNET:
            raise ModelLoadError(
                f"plans network {name!r} is not supported; only {_PLAIN_UNET} (TotalSegmentator's v2 "
                "networks) can be rebuilt so far"
            )
        try:
            n_stages = len(configuration["n_conv_per_stage_encoder"])
            base, top = int(configuration["UNet_base_num_features"]), int(configuration["unet_max_num_features"])
            arch = cls(
                input_channels=input_channels,
                num_classes=num_classes,
                features_per_stage=[min(base * 2**i, top) for i in range(n_stages)],
                kernel_sizes=_int_lists(configuration["conv_kernel_sizes"]),
                strides=_int_lists(configuration["pool_op_kernel_sizes"]),
                n_conv_per_stage=[int(v) for v in configuration["n_conv_per_stage_encoder"]],
                n_conv_per_stage_decoder=[int(v) for v in configuration["n_conv_per_stage_decoder"]],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"old-format plans configuration lacks or garbles {exc}") from exc
        arch.check()
        return arch

    @classmethod
    def _from_new_plans(cls, architecture: dict[str, Any], input_channels: int, num_classes: int) -> UNetArchitecture:
        name = str(architecture.get("network_class_name", ""))
        if name.rsplit(".", 1)[-1] != _PLAIN_UNET:
            raise ModelLoadError(f"plans network {name!r} is not supported; only {_PLAIN_UNET} can be rebuilt so far")
        kw = architecture.get("arch_kwargs", {})
        expected = {"conv_op": "Conv3d", "norm_op": "InstanceNorm3d", "nonlin": "LeakyReLU"}
        for key, cls_name in expected.items():
            if str(kw.get(key, "")).rsplit(".", 1)[-1] != cls_name:
                raise ModelLoadError(f"plans arch_kwargs {key}={kw.get(key)!r}; only {cls_name} is supported")
        if kw.get("dropout_op") not in (None, "None"):
            raise ModelLoadError(f"plans arch_kwargs dropout_op={kw['dropout_op']!r}; only None is supported")
        if kw.get("nonlin_first", False):
            raise ModelLoadError("plans arch_kwargs nonlin_first=True is not supported (conv -> norm -> nonlin only)")
        norm_kwargs = kw.get("norm_op_kwargs") or {}
        nonlin_kwargs = kw.get("nonlin_kwargs") or {}
        try:
            n_stages = int(kw["n_stages"])
            features = kw["features_per_stage"]
            features = [int(features)] * n_stages if isinstance(features, int) else [int(f) for f in features]
            n_conv = kw["n_conv_per_stage"]
            n_conv = [int(n_conv)] * n_stages if isinstance(n_conv, int) else [int(v) for v in n_conv]
            n_dec = kw["n_conv_per_stage_decoder"]
            n_dec = [int(n_dec)] * (n_stages - 1) if isinstance(n_dec, int) else [int(v) for v in n_dec]
            arch = cls(
                input_channels=input_channels,
                num_classes=num_classes,
                features_per_stage=features,
                kernel_sizes=_int_lists(kw["kernel_sizes"], n_stages),
                strides=_int_lists(kw["strides"], n_stages),
                n_conv_per_stage=n_conv,
                n_conv_per_stage_decoder=n_dec,
                conv_bias=bool(kw.get("conv_bias", False)),
                norm_eps=float(norm_kwargs.get("eps", 1e-5)),
                norm_affine=bool(norm_kwargs.get("affine", False)),
                negative_slope=float(nonlin_kwargs.get("negative_slope", 0.01)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"plans arch_kwargs lack or garble {exc}") from exc
        arch.check()
        return arch


def _int_lists(value: Any, n: int | None = None) -> list[list[int]]:
    """[[3, 3, 3], ...] from plans (an int means the same on every axis and stage)."""
    if isinstance(value, int):
        if n is None:
            raise ValueError("a scalar needs the number of stages")
        return [[value] * 3 for _ in range(n)]
    return [[int(v)] * 3 if isinstance(v, int) else [int(x) for x in v] for v in value]


class ConvNormNonlin(nn.Module):
    """Conv3d -> InstanceNorm3d -> LeakyReLU (DNA's ConvDropoutNormReLU without dropout)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: list[int], stride: list[int], arch: UNetArchitecture):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride, padding=[(k - 1) // 2 for k in kernel],
                              bias=arch.conv_bias)
        self.norm = nn.InstanceNorm3d(out_channels, eps=arch.norm_eps, affine=arch.norm_affine)
        self.nonlin = nn.LeakyReLU(arch.negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlin(self.norm(self.conv(x)))


class StackedConvs(nn.Module):
    """`n` ConvNormNonlin blocks; the first one carries the stride."""

    def __init__(self, n: int, in_channels: int, out_channels: int, kernel: list[int], stride: list[int],
                 arch: UNetArchitecture):
        super().__init__()
        blocks = [ConvNormNonlin(in_channels, out_channels, kernel, stride, arch)]
        blocks += [ConvNormNonlin(out_channels, out_channels, kernel, [1, 1, 1], arch) for _ in range(n - 1)]
        self.convs = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class Encoder(nn.Module):
    def __init__(self, arch: UNetArchitecture):
        super().__init__()
        stages, channels = [], arch.input_channels
        for s in range(arch.n_stages):
            # a one-element Sequential, as DNA's (keys encoder.stages.{s}.0.convs...)
            stages.append(nn.Sequential(StackedConvs(arch.n_conv_per_stage[s], channels, arch.features_per_stage[s],
                                                     arch.kernel_sizes[s], arch.strides[s], arch)))
            channels = arch.features_per_stage[s]
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class Decoder(nn.Module):
    def __init__(self, arch: UNetArchitecture):
        super().__init__()
        features = arch.features_per_stage
        stages, transpconvs, seg_layers = [], [], []
        for s in range(1, arch.n_stages):
            below, skip = features[-s], features[-(s + 1)]
            stride = arch.strides[-s]
            transpconvs.append(nn.ConvTranspose3d(below, skip, stride, stride, bias=arch.conv_bias))
            stages.append(StackedConvs(arch.n_conv_per_stage_decoder[s - 1], 2 * skip, skip,
                                       arch.kernel_sizes[-(s + 1)], [1, 1, 1], arch))
            # one head per decoder stage as in the checkpoints; inference uses the last one
            seg_layers.append(nn.Conv3d(skip, arch.num_classes, 1, 1, 0, bias=True))
        self.stages = nn.ModuleList(stages)
        self.transpconvs = nn.ModuleList(transpconvs)
        self.seg_layers = nn.ModuleList(seg_layers)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        x = skips[-1]
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(torch.cat((up(x), skips[-(s + 2)]), 1))
        return self.seg_layers[-1](x)


class PlainConvUNet(nn.Module):
    """Inference-only `PlainConvUNet`: image (B, C_in, *patch) -> logits (B, num_classes, *patch)."""

    def __init__(self, arch: UNetArchitecture):
        super().__init__()
        arch.check()
        self.arch = arch
        self.encoder = Encoder(arch)
        self.decoder = Decoder(arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def drop_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DNA's state dict without its duplicate keys (the same tensors under a second name)."""
    return {k: v for k, v in state.items() if not any(marker in k for marker in _ALIAS_MARKERS)}


def load_strict(model: PlainConvUNet, state: dict[str, torch.Tensor], what: str) -> None:
    """Load `state` into `model`; any missing/unexpected key or shape mismatch is an error."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ModelLoadError(
            f"{what} does not match the network its plans describe: {len(missing)} missing keys "
            f"{missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}"
        )
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if state[k].shape != own[k].shape]
    if wrong:
        raise ModelLoadError(f"{what}: {len(wrong)} tensors have other shapes than the plans say, e.g. {wrong[:3]}")
    model.load_state_dict(state, strict=True)
