"""Model definitions: config, registries and the `UniSegText` network."""

from unisegtext.models.config import (
    PRESETS,
    BackboneConfig,
    DecoderConfig,
    InferenceConfig,
    PreprocessingConfig,
    TextEncoderConfig,
    UniSegTextConfig,
    config_from_preset,
)
from unisegtext.models.modeling import (
    DEFAULT_MODEL,
    UniSegText,
    builtin_checkpoints,
    describe,
    resolve_checkpoint,
)
from unisegtext.models.registry import register_backbone, register_head

__all__ = [
    "PRESETS",
    "BackboneConfig",
    "DecoderConfig",
    "InferenceConfig",
    "PreprocessingConfig",
    "TextEncoderConfig",
    "UniSegTextConfig",
    "UniSegText",
    "config_from_preset",
    "builtin_checkpoints",
    "resolve_checkpoint",
    "describe",
    "register_backbone",
    "register_head",
    "DEFAULT_MODEL",
]
