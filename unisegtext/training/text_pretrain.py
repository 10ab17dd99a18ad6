"""Knowledge-enhanced text encoder: contrastive (InfoNCE) pre-training of the text adapter.

The text encoder of :class:`~unisegtext.models.UniSegText` is a frozen sentence encoder
(all-MiniLM-L6-v2) whose mean-pooled embedding passes a small residual adapter
(``LayerNorm -> Linear(H, A) -> GELU -> Linear(A, H)``, zero-initialised last layer, so an
untrained adapter is the identity). Because the base is frozen and the adapter acts on the
pooled embedding, the base embedding of every text of the knowledge tree is computed once
(cached under ``cache_dir``) and the adapter alone is trained on those vectors: minutes on a CPU.

Training pairs, all from the knowledge tree (``unisegtext.knowledge``):

* name <-> synonym (only synonyms of the training split, see below),
* name <-> definition,
* child name -> parent name (``is_a`` and ``part_of``), with a lower weight,

with in-batch negatives plus hard negatives drawn from the concepts nearest to the positive:
siblings (sharing a parent), the left/right counterpart (``kidney_left`` <-> ``kidney_right``)
and numeric neighbours (``vertebra_t4``/``vertebra_t6``, ``rib_left_2``/``rib_left_4``,
``vertebra_c7`` <-> ``vertebra_t1`` ...).

Held-out split: every (concept, synonym) pair goes to ``test`` (``test_fraction``), ``val``
(``val_fraction``) or ``train`` by a hash of ``(split_seed, concept id, synonym)``, so the split
is fixed and does not move when other concepts are added. Test and validation synonyms are
never trained on (neither are training texts of other concepts that equal them). The
adapter of the epoch with the best validation top-1 is kept (epoch 0 = the identity, so
training never ships an adapter worse than the base on validation); the test split is only
read for the final figures.

Output folder (``unisegtext/checkpoints/text_adapter/`` ships with the package):

* ``model.safetensors``: the adapter's ``nn.Sequential`` state dict with unprefixed keys
  ``0.weight, 0.bias`` (LayerNorm), ``1.weight, 1.bias``, ``3.weight, 3.bias`` (the Linears);
  they load into ``model.text_encoder.adapter`` (prefix ``text_encoder.adapter.`` in a full
  UniSegText state dict).
* ``meta.json``: base, pooling, max_length, hidden_size, adapter_dim, template, ontology
  version, split, training settings and figures.

Command::

    python -m unisegtext.training.text_pretrain --config train/text_pretrain.yaml

Load into a model with :func:`load_text_adapter`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unisegtext.errors import ConfigError, ModelLoadError, did_you_mean
from unisegtext.jsonsafe import json_safe as _json_safe

if TYPE_CHECKING:  # torch and numpy are imported inside the functions that need them
    import numpy as np
    import torch
    from torch import nn

    from unisegtext.knowledge import KnowledgeTree
    from unisegtext.models.config import TextEncoderConfig

logger = logging.getLogger(__name__)

ADAPTER_FORMAT = "unisegtext-text-adapter"
ADAPTER_FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
META_NAME = "meta.json"
KINDS = ("synonym", "definition", "parent")


# --------------------------------------------------------------------------- config
@dataclass
class TextPretrainConfig:
    """Settings of a knowledge pre-training run (``train/text_pretrain.yaml``).

    Attributes:
        preset: model size preset whose text settings (base, adapter_dim, pooling, max_length,
            template) the adapter is trained for ("nano": adapter_dim 256).
        output_dir: where ``model.safetensors`` and ``meta.json`` are written.
        cache_dir: where base embeddings are cached (one ``.npy`` + ``.json`` per base setting).
        test_fraction: share of (concept, synonym) pairs held out for the final test.
        val_fraction: share held out for choosing the epoch.
        split_seed: seed of the held-out split (hash-based, fixed).
        seed: seed of initialisation and batch order.
        epochs: passes over the training pairs.
        batch_size: pairs per step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        temperature: InfoNCE temperature (initial value when learnable).
        learn_temperature: learn the temperature (clamped to [0.01, 0.5]).
        hard_negatives: hard negatives drawn per pair and step.
        embedding_dropout: dropout on the cached base embeddings during training (regularises).
        weights: loss weight per pair kind (synonym, definition, parent).
        max_sibling_negatives: at most this many siblings per concept kept as hard negatives.
        threads: torch CPU threads (0: leave torch's default).
        device: "cpu" or "cuda".
        free_text_prompts: TSV of hand-written prompts (prompt, expected); figures only.
    """

    preset: str = "nano"
    output_dir: str = "unisegtext/checkpoints/text_adapter"
    cache_dir: str = str(Path(tempfile.gettempdir()) / "unisegtext_text_cache")
    test_fraction: float = 0.15
    val_fraction: float = 0.05
    split_seed: int = 0
    seed: int = 0
    epochs: int = 40
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 0.05
    learn_temperature: bool = False
    hard_negatives: int = 4
    embedding_dropout: float = 0.1
    weights: dict[str, float] = field(default_factory=lambda: {"synonym": 1.0, "definition": 0.5, "parent": 0.25})
    max_sibling_negatives: int = 64
    threads: int = 0
    device: str = "cpu"
    free_text_prompts: str = "eval/prompts/heldout_prompts.tsv"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not 0.0 <= self.test_fraction < 1.0 or not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(
                f"test_fraction {self.test_fraction} and val_fraction {self.val_fraction} must be in [0, 1)"
            )
        if self.test_fraction + self.val_fraction >= 1.0:
            raise ConfigError(
                f"test_fraction + val_fraction = {self.test_fraction + self.val_fraction}; leave some "
                "synonyms for training (the sum must be below 1)"
            )
        if self.epochs < 0 or self.batch_size < 2:
            raise ConfigError(f"epochs must be >= 0 and batch_size >= 2, got {self.epochs} and {self.batch_size}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        unknown = set(self.weights) - set(KINDS)
        if unknown:
            raise ConfigError(f"weights has unknown pair kinds {sorted(unknown)}; known: {list(KINDS)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextPretrainConfig:
        """Build from a mapping; an unknown key is an error (a typo must not pass silently)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a text pre-training config must be a mapping, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigError(f"unknown text pre-training key {key!r}.{did_you_mean(key, names)}")
        kwargs = dict(data)
        if "weights" in kwargs:
            kwargs["weights"] = {**cls().weights, **dict(kwargs["weights"] or {})}
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TextPretrainConfig:
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: not a readable YAML config ({exc})") from exc
        return cls.from_dict(data)

    def text_config(self) -> TextEncoderConfig:
        """The text encoder settings of the preset the adapter is trained for."""
        from unisegtext.models.config import config_from_preset

        return config_from_preset(self.preset).text


# --------------------------------------------------------------------------- adapter
def build_adapter(hidden_size: int, adapter_dim: int) -> nn.Sequential:
    """The residual adapter of :class:`~unisegtext.models.text_encoder.TextEncoder`.

    Same layout (so state dicts are interchangeable): LayerNorm(H) -> Linear(H, A) -> GELU ->
    Linear(A, H), last layer zero-initialised (the residual ``x + adapter(x)`` starts as the
    identity).
    """
    from torch import nn

    if adapter_dim <= 0:
        raise ConfigError(f"adapter_dim must be positive to train an adapter, got {adapter_dim}")
    adapter = nn.Sequential(
        nn.LayerNorm(hidden_size), nn.Linear(hidden_size, adapter_dim), nn.GELU(), nn.Linear(adapter_dim, hidden_size)
    )
    nn.init.zeros_(adapter[-1].weight)
    nn.init.zeros_(adapter[-1].bias)
    return adapter


def apply_adapter(adapter: nn.Module | None, pooled: torch.Tensor) -> torch.Tensor:
    """``pooled + adapter(pooled)``, as in ``TextEncoder.forward``; (N, H) -> (N, H)."""
    return pooled if adapter is None else pooled + adapter(pooled)


def default_adapter_path() -> Path:
    """The adapter shipped with the package (``unisegtext/checkpoints/text_adapter``)."""
    return Path(str(resources.files("unisegtext"))) / "checkpoints" / "text_adapter"


def read_adapter_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of an adapter folder, checked for format."""
    folder = Path(path)
    meta_file = folder / META_NAME
    if not (folder / WEIGHTS_NAME).is_file() or not meta_file.is_file():
        raise ModelLoadError(
            f"{folder} is not a text adapter folder: expected {WEIGHTS_NAME} and {META_NAME} in it; "
            "train one with `python -m unisegtext.training.text_pretrain --config train/text_pretrain.yaml`"
        )
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{meta_file}: not valid JSON ({exc})") from exc
    if meta.get("format") != ADAPTER_FORMAT:
        raise ModelLoadError(f"{meta_file}: format is {meta.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    if int(meta.get("format_version", 0)) > ADAPTER_FORMAT_VERSION:
        raise ModelLoadError(
            f"{meta_file}: format_version {meta.get('format_version')} is newer than this library "
            f"understands ({ADAPTER_FORMAT_VERSION}); upgrade unisegtext"
        )
    return meta


def load_text_adapter(model: nn.Module, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Load knowledge-pre-trained adapter weights into a model's text encoder, strictly.

    Args:
        model: a :class:`~unisegtext.models.UniSegText` or its ``TextEncoder``.
        path: an adapter folder (``model.safetensors`` + ``meta.json``); default: the one
            shipped in ``unisegtext/checkpoints/text_adapter``.

    Returns:
        The adapter's ``meta.json`` (training settings and figures).

    Raises:
        ModelLoadError: the folder is incomplete, or its base, pooling, max_length, hidden
            size or adapter_dim differ from the model's, or a key is missing or unexpected.
    """
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else default_adapter_path()
    meta = read_adapter_meta(folder)
    encoder = getattr(model, "text_encoder", model)
    cfg = getattr(encoder, "config", None)
    adapter = getattr(encoder, "adapter", None)
    if cfg is None or not hasattr(encoder, "base"):
        raise ModelLoadError(f"load_text_adapter needs a UniSegText or TextEncoder, got {type(model).__name__}")
    if adapter is None:
        raise ModelLoadError(
            f"the model has no text adapter (text.adapter_dim = {cfg.adapter_dim}); the adapter in "
            f"{folder} has adapter_dim {meta.get('adapter_dim')}: build the model with that adapter_dim"
        )
    expected = {
        "base": cfg.base,
        "pooling": cfg.pooling,
        "max_length": cfg.max_length,
        "hidden_size": cfg.hidden_size,
        "adapter_dim": cfg.adapter_dim,
    }
    wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        detail = "; ".join(f"{k}: adapter {a!r}, model {m!r}" for k, (a, m) in wrong.items())
        raise ModelLoadError(
            f"the text adapter in {folder} was trained for another text encoder ({detail}); train one for "
            "this model's text settings (train/text_pretrain.yaml, key `preset`) or use a matching preset"
        )
    if meta.get("template") != cfg.template:
        logger.warning(
            "the text adapter in %s was trained with template %r, the model uses %r; "
            "the adapter still loads, but prompts are encoded differently from its training",
            folder, meta.get("template"), cfg.template,
        )
    state = load_file(str(folder / WEIGHTS_NAME))
    own = adapter.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ModelLoadError(
            f"{folder / WEIGHTS_NAME} does not match the model's text adapter: missing {missing}, "
            f"unexpected {unexpected}, shape mismatches {shapes}"
        )
    adapter.load_state_dict(state, strict=True)
    if hasattr(model, "clear_text_cache"):
        model.clear_text_cache()
    logger.info("loaded the knowledge-pre-trained text adapter from %s", folder)
    return meta


def save_text_adapter(adapter: nn.Module, folder: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` (unprefixed Sequential keys) + ``meta.json`` atomically."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
    meta = {"format": ADAPTER_FORMAT, "format_version": ADAPTER_FORMAT_VERSION, **meta}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        save_file(state, str(Path(tmp) / WEIGHTS_NAME), metadata={"format": "pt", "library": "unisegtext", "kind": ADAPTER_FORMAT})
        (Path(tmp) / META_NAME).write_text(json.dumps(_json_safe(meta), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(Path(tmp) / WEIGHTS_NAME, out / WEIGHTS_NAME)
        os.replace(Path(tmp) / META_NAME, out / META_NAME)
    for name in (WEIGHTS_NAME, META_NAME):
        (out / name).chmod(0o644)  # package data: readable by everyone
    return out




# --------------------------------------------------------------------------- base embeddings
class BaseEmbeddingStore:
    """Pooled base embeddings of texts, computed once and cached on disk.

    The frozen base gives each text the same vector every time, so the knowledge pre-training
    and the retrieval evaluation embed every text once (``<cache_dir>/<key>.npy`` + ``.json``
    with the texts). The key covers base, pooling and max_length.
    """

    def __init__(self, text_config: TextEncoderConfig, cache_dir: str | os.PathLike | None, batch_size: int = 128):
        self.text_config = text_config
        self.batch_size = batch_size
        key = json.dumps([text_config.base, text_config.pooling, text_config.max_length])
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        self.path = Path(cache_dir) / f"base_{digest}" if cache_dir is not None else None
        self._encoder = None
        self._rows: dict[str, int] = {}
        self._matrix = None
        self._load()

    def _load(self) -> None:
        import numpy as np

        if self.path is None:
            return
        vec, txt = self.path.with_suffix(".npy"), self.path.with_suffix(".json")
        if vec.is_file() and txt.is_file():
            try:
                texts = json.loads(txt.read_text(encoding="utf-8"))
                matrix = np.load(vec)
            except (OSError, ValueError) as exc:
                logger.warning("ignoring an unreadable embedding cache %s (%s)", self.path, exc)
                return
            if len(texts) == len(matrix):
                self._rows = {t: i for i, t in enumerate(texts)}
                self._matrix = matrix

    def _save(self) -> None:
        import numpy as np

        if self.path is None or self._matrix is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        texts = sorted(self._rows, key=self._rows.__getitem__)
        with tempfile.NamedTemporaryFile(dir=self.path.parent, suffix=".npy", delete=False) as f:
            np.save(f, self._matrix)
        os.replace(f.name, self.path.with_suffix(".npy"))
        tmp_txt = self.path.with_suffix(".json.tmp")
        tmp_txt.write_text(json.dumps(texts), encoding="utf-8")
        os.replace(tmp_txt, self.path.with_suffix(".json"))

    def _encode(self, texts: list[str]) -> np.ndarray:
        import numpy as np
        import torch

        from unisegtext.models.text_encoder import TextEncoder

        if self._encoder is None:
            cfg = dataclasses.replace(self.text_config, adapter_dim=0, freeze_base=True)
            self._encoder = TextEncoder(cfg).eval()
        with torch.inference_mode():
            return self._encoder.embed_base(texts).float().cpu().numpy().astype(np.float32)

    def embed(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """(N, H) float32 base embeddings of ``texts`` (computing only the missing ones)."""
        import numpy as np

        missing = sorted({t for t in texts if t not in self._rows}, key=lambda t: (len(t), t))
        if missing:
            logger.info("embedding %d new texts with the base encoder (cached in %s)", len(missing), self.path)
            start, last_save = time.time(), time.time()
            chunks = []
            for i in range(0, len(missing), self.batch_size):
                chunk = missing[i : i + self.batch_size]
                chunks.append(self._encode(chunk))
                done = i + len(chunk)
                if progress and (i // self.batch_size) % 20 == 19:
                    logger.info("  %d / %d texts (%.0f s)", done, len(missing), time.time() - start)
                if time.time() - last_save > 60 or done == len(missing):  # keep progress on interruption
                    new = np.concatenate(chunks)
                    base = len(self._rows)
                    for j, t in enumerate(missing[done - len(new) : done]):
                        self._rows[t] = base + j
                    self._matrix = new if self._matrix is None else np.concatenate([self._matrix, new])
                    chunks = []
                    self._save()
                    last_save = time.time()
        return self._matrix[[self._rows[t] for t in texts]] if len(texts) else np.zeros((0, self.text_config.hidden_size), np.float32)


class AdaptedEmbedder:
    """texts -> (N, H) numpy array of ``x + adapter(x)`` embeddings: an ``embedder`` for
    :meth:`~unisegtext.knowledge.KnowledgeTree.resolve` (its embedding fallback).

    Args:
        adapter: the adapter module, or None for the base encoder alone.
        store: base embeddings (cached).
    """

    def __init__(self, adapter: nn.Module | None, store: BaseEmbeddingStore):
        self.adapter = adapter.eval() if adapter is not None else None
        self.store = store

    @classmethod
    def from_path(cls, path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> AdaptedEmbedder:
        """The embedder of an adapter folder (default: the shipped adapter)."""
        from safetensors.torch import load_file

        from unisegtext.models.config import TextEncoderConfig

        folder = Path(path) if path is not None else default_adapter_path()
        meta = read_adapter_meta(folder)
        cfg = TextEncoderConfig(
            base=meta["base"], pooling=meta["pooling"], max_length=meta["max_length"],
            adapter_dim=meta["adapter_dim"], template=meta["template"], hidden_size=meta["hidden_size"],
        )
        adapter = build_adapter(meta["hidden_size"], meta["adapter_dim"])
        adapter.load_state_dict(load_file(str(folder / WEIGHTS_NAME)), strict=True)
        return cls(adapter, BaseEmbeddingStore(cfg, cache_dir))

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        with torch.no_grad():
            pooled = torch.from_numpy(self.store.embed(list(texts)))
            return apply_adapter(self.adapter, pooled).numpy()


# --------------------------------------------------------------------------- pairs and split
@dataclass
class SynonymSplit:
    """(concept id, synonym) pairs by split; texts are the raw synonyms (not templated)."""

    train: list[tuple[str, str]]
    val: list[tuple[str, str]]
    test: list[tuple[str, str]]
    dropped_ambiguous: int = 0

    def summary(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test), "dropped_ambiguous": self.dropped_ambiguous}


def _bucket(split_seed: int, concept_id: str, synonym: str) -> float:
    digest = hashlib.sha1(f"{split_seed}\x00{concept_id}\x00{synonym}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _key(text: str) -> str:
    return " ".join(text.casefold().split())


def split_synonyms(tree: KnowledgeTree, test_fraction: float = 0.15, val_fraction: float = 0.05, split_seed: int = 0) -> SynonymSplit:
    """Assign every (concept, synonym) pair to train / val / test by a fixed hash.

    A held-out synonym whose text (case-folded) is also an id or name of any concept, or a
    synonym of another concept, is dropped from the evaluation (it is ambiguous or found by
    plain lookup); a training synonym whose text equals a held-out one is not trained on.
    """
    names = {_key(c.name) for c in tree.concepts.values()} | {_key(c.id) for c in tree.concepts.values()}
    owners: dict[str, set[str]] = {}
    for c in tree.concepts.values():
        for s in c.synonyms:
            owners.setdefault(_key(s), set()).add(c.id)
    buckets: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    dropped = 0
    for cid in sorted(tree.concepts):
        for synonym in dict.fromkeys(tree.concepts[cid].synonyms):
            u = _bucket(split_seed, cid, synonym)
            part = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
            if part != "train" and (_key(synonym) in names or len(owners[_key(synonym)]) > 1):
                dropped += 1  # ambiguous or found by plain lookup: not a fair test item (nor trained on)
                continue
            buckets[part].append((cid, synonym))
    held = {_key(s) for part in ("val", "test") for _, s in buckets[part]}
    train = [(c, s) for c, s in buckets["train"] if _key(s) not in held]
    return SynonymSplit(train=train, val=buckets["val"], test=buckets["test"], dropped_ambiguous=dropped)


_NUMBERED = re.compile(r"^(.*?)(\d+)$")
_SPINE_ORDER = [f"vertebra_c{i}" for i in range(1, 8)] + [f"vertebra_t{i}" for i in range(1, 13)] + [f"vertebra_l{i}" for i in range(1, 6)] + ["sacrum"]


def lateral_counterpart(concept_id: str) -> str:
    """The id with ``left`` and ``right`` swapped as words ("rib_left_3" -> "rib_right_3")."""
    swap = {"left": "right", "right": "left"}
    return "_".join(swap.get(part, part) for part in concept_id.split("_"))


def hard_negative_ids(tree: KnowledgeTree, concept_id: str, max_siblings: int = 64, rng: random.Random | None = None) -> list[str]:
    """Concepts a prompt for ``concept_id`` is most easily confused with, nearest first.

    Left/right counterpart, numeric neighbours (vertebrae across region borders, ribs, liver
    segments), then siblings sharing an ``is_a`` or ``part_of`` parent (at most
    ``max_siblings``, sampled when there are more). Ancestors and descendants are excluded.
    """
    concepts = tree.concepts
    out: list[str] = []
    other = lateral_counterpart(concept_id)
    if other != concept_id and other in concepts:
        out.append(other)
    if concept_id in _SPINE_ORDER:
        i = _SPINE_ORDER.index(concept_id)
        out += [_SPINE_ORDER[j] for j in (i - 1, i + 1) if 0 <= j < len(_SPINE_ORDER)]
    match = _NUMBERED.match(concept_id)
    if match:
        stem, number = match.group(1), int(match.group(2))
        out += [f"{stem}{n}" for n in (number - 1, number + 1) if f"{stem}{n}" in concepts]
    concept = concepts[concept_id]
    siblings: list[str] = []
    for parent in dict.fromkeys((*concept.part_of, *concept.is_a)):
        if parent in concepts:
            siblings += [c for c in tree.children(parent) if c != concept_id]
    siblings = list(dict.fromkeys(s for s in siblings if s not in out))
    if len(siblings) > max_siblings:
        siblings = (rng or random.Random(concept_id)).sample(siblings, max_siblings)
    related = set(tree.ancestors(concept_id)) | set(tree.descendants(concept_id)) | {concept_id}
    return [c for c in dict.fromkeys(out + siblings) if c in concepts and c not in related]


@dataclass
class PairSet:
    """Training pairs as text indices into ``texts`` (see :func:`build_pairs`)."""

    texts: list[str]
    anchor: list[int]
    positive: list[int]
    anchor_concept: list[int]
    positive_concept: list[int]
    kind: list[str]
    concept_ids: list[str]
    name_text: list[int]
    definition_text: list[int]
    hard_negatives: list[list[int]]

    def counts(self) -> dict[str, int]:
        return {k: self.kind.count(k) for k in KINDS}


def build_pairs(tree: KnowledgeTree, split: SynonymSplit, template: str = "{name}", max_siblings: int = 64, seed: int = 0) -> PairSet:
    """Contrastive pairs from the tree: synonym -> name, name -> definition, child -> parent.

    Names and synonyms are formatted with the model's ``template`` (what the model encodes);
    definitions are encoded as they are. Only training-split synonyms are used.
    """
    rng = random.Random(seed)
    concept_ids = sorted(tree.concepts)
    cindex = {cid: i for i, cid in enumerate(concept_ids)}
    texts: list[str] = []
    tindex: dict[str, int] = {}

    def text_id(text: str) -> int:
        if text not in tindex:
            tindex[text] = len(texts)
            texts.append(text)
        return tindex[text]

    name_text = [text_id(template.format(name=tree.concepts[c].name)) for c in concept_ids]
    definition_text = [text_id(tree.concepts[c].definition) if tree.concepts[c].definition else -1 for c in concept_ids]
    pairs: dict[str, list] = {k: [] for k in ("anchor", "positive", "anchor_concept", "positive_concept", "kind")}

    def add(a: int, p: int, ca: str, cp: str, kind: str) -> None:
        if a == p:
            return
        for key, value in zip(pairs, (a, p, cindex[ca], cindex[cp], kind)):
            pairs[key].append(value)

    for cid, synonym in split.train:
        add(text_id(template.format(name=synonym)), name_text[cindex[cid]], cid, cid, "synonym")
    for cid in concept_ids:
        if definition_text[cindex[cid]] >= 0:
            add(name_text[cindex[cid]], definition_text[cindex[cid]], cid, cid, "definition")
        concept = tree.concepts[cid]
        for parent in dict.fromkeys((*concept.is_a, *concept.part_of)):
            if parent in cindex:
                add(name_text[cindex[cid]], name_text[cindex[parent]], cid, parent, "parent")
    hard = [[cindex[h] for h in hard_negative_ids(tree, cid, max_siblings, rng)] for cid in concept_ids]
    return PairSet(
        texts=texts, concept_ids=concept_ids, name_text=name_text, definition_text=definition_text,
        hard_negatives=hard, **pairs,
    )


# --------------------------------------------------------------------------- retrieval
@dataclass
class Gallery:
    """Texts that stand for concepts in retrieval: each text row belongs to one concept."""

    texts: list[str]
    owner: list[int]
    concept_ids: list[str]


def make_gallery(tree: KnowledgeTree, *, synonyms: Iterable[tuple[str, str]] = (), template: str = "{name}") -> Gallery:
    """Concept names (templated) plus the given (concept id, synonym) pairs."""
    concept_ids = sorted(tree.concepts)
    cindex = {c: i for i, c in enumerate(concept_ids)}
    texts = [template.format(name=tree.concepts[c].name) for c in concept_ids]
    owner = list(range(len(concept_ids)))
    for cid, synonym in synonyms:
        texts.append(template.format(name=synonym))
        owner.append(cindex[cid])
    return Gallery(texts, owner, concept_ids)


def rank_concepts(query: torch.Tensor, gallery: torch.Tensor, owner: torch.Tensor, num_concepts: int, k: int = 5, chunk: int = 1024) -> torch.Tensor:
    """Top-``k`` concepts per query by cosine similarity, max over each concept's texts.

    Args:
        query: (Q, H) embeddings.
        gallery: (G, H) embeddings of gallery texts.
        owner: (G,) concept index of each gallery row.
        num_concepts: number of concepts C.

    Returns:
        (Q, k) concept indices, best first.
    """
    import torch
    import torch.nn.functional as F

    q = F.normalize(query.float(), dim=-1)
    g = F.normalize(gallery.float(), dim=-1)
    out = []
    for i in range(0, len(q), chunk):
        sim = q[i : i + chunk] @ g.T  # (q, G)
        best = torch.full((sim.shape[0], num_concepts), -2.0, dtype=sim.dtype)
        best.scatter_reduce_(1, owner.unsqueeze(0).expand_as(sim), sim, reduce="amax")
        out.append(best.topk(min(k, num_concepts), dim=1).indices)
    return torch.cat(out) if out else torch.zeros((0, k), dtype=torch.long)


def topk_accuracy(ranked: torch.Tensor, expected: Sequence[int]) -> dict[str, float]:
    """``{"top1", "top5", "n"}`` of ranked concept indices (Q, k) against expected indices."""
    import torch

    if len(expected) == 0:
        return {"top1": float("nan"), "top5": float("nan"), "n": 0}
    target = torch.as_tensor(list(expected)).unsqueeze(1)
    return {
        "top1": float((ranked[:, :1] == target).any(1).float().mean()),
        "top5": float((ranked[:, :5] == target).any(1).float().mean()),
        "n": len(expected),
    }


def read_prompt_tsv(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(prompt, expected concept id) rows of a TSV with a ``prompt<TAB>expected`` header; ``#`` lines are comments."""
    file = Path(path)
    try:
        lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]
    except OSError as exc:
        raise ConfigError(f"cannot read the prompt list {file} ({exc})") from exc
    rows = list(csv.DictReader(lines, delimiter="\t"))
    if rows and not {"prompt", "expected"} <= set(rows[0]):
        raise ConfigError(f"{file}: expected the columns 'prompt' and 'expected', got {sorted(rows[0])}")
    return [(r["prompt"], r["expected"]) for r in rows]


# --------------------------------------------------------------------------- training
@dataclass
class EpochRecord:
    epoch: int
    loss: float | None  # None for epoch 0 (the untrained identity adapter)
    val_top1: float
    val_top5: float
    temperature: float
    seconds: float


class _Trainer:
    """Adapter training on cached base embeddings (all tensors on one device)."""

    def __init__(self, config: TextPretrainConfig, pairs: PairSet, base: torch.Tensor, hidden: int, adapter_dim: int):
        import torch

        self.config = config
        self.pairs = pairs
        self.device = torch.device(config.device)
        self.base = base.to(self.device)  # (T, H) base embeddings of pairs.texts
        torch.manual_seed(config.seed)
        self.adapter = build_adapter(hidden, adapter_dim).to(self.device)
        self.log_temp = torch.nn.Parameter(torch.tensor(math.log(config.temperature), device=self.device), requires_grad=config.learn_temperature)
        params = list(self.adapter.parameters()) + ([self.log_temp] if config.learn_temperature else [])
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.rng = random.Random(config.seed)
        as_long = lambda xs: torch.as_tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        self.anchor, self.positive = as_long(pairs.anchor), as_long(pairs.positive)
        self.anchor_concept, self.positive_concept = as_long(pairs.anchor_concept), as_long(pairs.positive_concept)
        self.weight = torch.as_tensor([config.weights.get(k, 1.0) for k in pairs.kind], dtype=torch.float32, device=self.device)
        self.is_definition = torch.as_tensor([k == "definition" for k in pairs.kind], device=self.device)
        self.is_parent = torch.as_tensor([k == "parent" for k in pairs.kind], device=self.device)
        self.name_text = as_long(pairs.name_text)
        self.definition_text = as_long([d if d >= 0 else n for d, n in zip(pairs.definition_text, pairs.name_text)])
        self.num_concepts = len(pairs.concept_ids)

    def temperature(self) -> float:
        return float(self.log_temp.exp().clamp(0.01, 0.5))

    def embed(self, index: torch.Tensor, train: bool) -> torch.Tensor:
        import torch.nn.functional as F

        x = self.base[index]
        if train and self.config.embedding_dropout > 0:
            x = F.dropout(x, self.config.embedding_dropout, training=True)
        return F.normalize(apply_adapter(self.adapter, x), dim=-1)

    def sample_hard(self, positive_concept: list[int]) -> list[int]:
        out = []
        for c in positive_concept:
            pool = self.pairs.hard_negatives[c]
            for _ in range(self.config.hard_negatives):
                out.append(self.rng.choice(pool) if pool else self.rng.randrange(self.num_concepts))
        return out

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Weighted symmetric InfoNCE of a batch of pair indices (B,).

        Anchor -> positive: in-batch positives plus the anchor's own ``k`` hard negatives;
        positive -> anchor: in-batch anchors (not for child -> parent pairs, which go one way).
        Columns that stand for the anchor's or the positive's concept are masked out.
        """
        import torch
        import torch.nn.functional as F

        a_idx, p_idx = self.anchor[batch], self.positive[batch]
        a_c, p_c = self.anchor_concept[batch], self.positive_concept[batch]
        size, k = len(batch), self.config.hard_negatives
        neg_c = torch.as_tensor(self.sample_hard(p_c.tolist()), dtype=torch.long, device=self.device).view(size, k)
        use_def = self.is_definition[batch].unsqueeze(1).expand(size, k)
        neg_idx = torch.where(use_def, self.definition_text[neg_c], self.name_text[neg_c])  # (B, k)
        # each distinct text through the adapter once
        unique, inverse = torch.unique(torch.cat([a_idx, p_idx, neg_idx.reshape(-1)]), return_inverse=True)
        a, p, n = self.embed(unique, True)[inverse].split([size, size, size * k])  # (B, H), (B, H), (B*k, H)
        n = n.view(size, k, -1)
        t = self.log_temp.exp().clamp(0.01, 0.5)
        eye = torch.eye(size, dtype=torch.bool, device=self.device)
        false_neg = (p_c[None] == p_c[:, None]) | (p_c[None] == a_c[:, None]) | (p_idx[None] == p_idx[:, None])
        false_neg &= ~eye
        hard_false = (neg_c == p_c[:, None]) | (neg_c == a_c[:, None]) | (neg_idx == p_idx[:, None])
        logits = torch.cat([(a @ p.T).masked_fill(false_neg, float("-inf")),
                            torch.einsum("bh,bkh->bk", a, n).masked_fill(hard_false, float("-inf"))], dim=1) / t  # (B, B + k)
        target = torch.arange(size, device=self.device)
        row = F.cross_entropy(logits, target, reduction="none")
        rev_false = (a_c[None] == a_c[:, None]) | (a_c[None] == p_c[:, None]) | (a_idx[None] == a_idx[:, None])
        rev_false &= ~eye
        rev = F.cross_entropy(((p @ a.T) / t).masked_fill(rev_false, float("-inf")), target, reduction="none")
        rev = torch.where(self.is_parent[batch], torch.zeros_like(rev), rev)
        w = self.weight[batch]
        return (w * (row + rev)).sum() / w.sum().clamp(min=1e-8)

    def train_epoch(self) -> float:
        import torch

        self.adapter.train()
        order = torch.randperm(len(self.anchor), generator=torch.Generator().manual_seed(self.rng.randrange(2**31))).to(self.device)
        total, steps = 0.0, 0
        bs = self.config.batch_size
        for i in range(0, len(order), bs):
            batch = order[i : i + bs]
            if len(batch) < 2:
                continue
            loss = self.loss(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach())
            steps += 1
        return total / max(steps, 1)


@dataclass
class RetrievalSet:
    """Queries with expected concept indices and the gallery they are ranked against."""

    name: str
    queries: list[str]
    expected: list[int]
    gallery: Gallery


def evaluate_retrieval(
    sets: Sequence[RetrievalSet], store: BaseEmbeddingStore, adapter: nn.Module | None, device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """Top-1/top-5 of each retrieval set with ``x + adapter(x)`` embeddings (``None``: the base)."""
    import torch

    out = {}
    for rs in sets:
        with torch.no_grad():
            q = apply_adapter(adapter, torch.from_numpy(store.embed(rs.queries)).to(device))
            g = apply_adapter(adapter, torch.from_numpy(store.embed(rs.gallery.texts)).to(device))
            ranked = rank_concepts(q.cpu(), g.cpu(), torch.as_tensor(rs.gallery.owner), len(rs.gallery.concept_ids))
        out[rs.name] = topk_accuracy(ranked, rs.expected)
    return out


def synonym_sets(tree: KnowledgeTree, split: SynonymSplit, part: str, template: str) -> list[RetrievalSet]:
    """The ``part`` split ("val"/"test") as two retrieval sets: names-only gallery and names + training synonyms."""
    items = getattr(split, part)
    cids = sorted(tree.concepts)
    cindex = {c: i for i, c in enumerate(cids)}
    queries = [template.format(name=s) for _, s in items]
    expected = [cindex[c] for c, _ in items]
    return [
        RetrievalSet(f"{part}/names", queries, expected, make_gallery(tree, template=template)),
        RetrievalSet(f"{part}/names+synonyms", queries, expected, make_gallery(tree, synonyms=split.train, template=template)),
    ]


def free_text_sets(tree: KnowledgeTree, prompts: Sequence[tuple[str, str]], template: str) -> list[RetrievalSet]:
    """Hand-written prompts against names only and against names + all synonyms (the deployed dictionary)."""
    cids = sorted(tree.concepts)
    cindex = {c: i for i, c in enumerate(cids)}
    unknown = sorted({e for _, e in prompts if e not in cindex})
    if unknown:
        raise ConfigError(f"expected concept ids not in the knowledge tree: {unknown}")
    queries = [template.format(name=p) for p, _ in prompts]
    expected = [cindex[e] for _, e in prompts]
    every = [(c.id, s) for c in tree.concepts.values() for s in c.synonyms]
    return [
        RetrievalSet("free_text/names", queries, expected, make_gallery(tree, template=template)),
        RetrievalSet("free_text/names+synonyms", queries, expected, make_gallery(tree, synonyms=every, template=template)),
    ]


def train_text_adapter(config: TextPretrainConfig, *, tree: KnowledgeTree | None = None, output_dir: str | os.PathLike | None = None, command: str = "") -> dict[str, Any]:
    """Run knowledge pre-training and write the adapter folder; returns its ``meta.json``.

    Args:
        config: the run's settings.
        tree: a knowledge tree (default: the packaged one).
        output_dir: overrides ``config.output_dir``.
        command: the command line, recorded in ``meta.json``.
    """
    import torch

    from unisegtext.knowledge import load_tree

    tree = tree or load_tree()
    if config.threads:
        torch.set_num_threads(config.threads)
    text_cfg = config.text_config()
    split = split_synonyms(tree, config.test_fraction, config.val_fraction, config.split_seed)
    pairs = build_pairs(tree, split, text_cfg.template, config.max_sibling_negatives, config.seed)
    logger.info("knowledge tree %s: %d concepts; synonyms %s; pairs %s", tree.version, len(tree), split.summary(), pairs.counts())

    store = BaseEmbeddingStore(text_cfg, config.cache_dir)
    val_sets = synonym_sets(tree, split, "val", text_cfg.template)
    # embed everything needed up front (one pass of the base encoder, cached)
    store.embed(list(dict.fromkeys(pairs.texts + [q for s in val_sets for q in s.queries])), progress=True)
    base = torch.from_numpy(store.embed(pairs.texts))
    trainer = _Trainer(config, pairs, base, text_cfg.hidden_size, text_cfg.adapter_dim)

    def validate() -> dict[str, dict[str, float]]:
        trainer.adapter.eval()
        return evaluate_retrieval(val_sets, store, trainer.adapter, config.device)

    history: list[EpochRecord] = []
    start = time.time()
    val = validate()
    select = "val/names"
    best = (val[select]["top1"], val[select]["top5"])
    best_state = {k: v.detach().clone() for k, v in trainer.adapter.state_dict().items()}
    best_epoch = 0
    history.append(EpochRecord(0, None, val[select]["top1"], val[select]["top5"], trainer.temperature(), 0.0))
    logger.info("epoch 0 (identity adapter): val top-1 %.3f top-5 %.3f", *best)
    for epoch in range(1, config.epochs + 1):
        loss = trainer.train_epoch()
        val = validate()
        score = (val[select]["top1"], val[select]["top5"])
        history.append(EpochRecord(epoch, loss, *score, trainer.temperature(), time.time() - start))
        logger.info("epoch %d: loss %.4f, val top-1 %.3f top-5 %.3f (%.0f s)", epoch, loss, *score, time.time() - start)
        if score > best:
            best, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in trainer.adapter.state_dict().items()}
    trainer.adapter.load_state_dict(best_state)
    trainer.adapter.eval().cpu()

    # final figures: read the test split (and the hand-written prompts) once, after selection
    figures: dict[str, Any] = {}
    final_sets = synonym_sets(tree, split, "test", text_cfg.template) + val_sets
    prompt_file = Path(config.free_text_prompts) if config.free_text_prompts else None
    if prompt_file is not None and prompt_file.is_file():
        final_sets += free_text_sets(tree, read_prompt_tsv(prompt_file), text_cfg.template)
    for label, adapter in (("base", None), ("knowledge", trainer.adapter)):
        figures[label] = {k: {m: round(v, 4) if isinstance(v, float) else v for m, v in r.items()} for k, r in evaluate_retrieval(final_sets, store, adapter).items()}

    meta = {
        "base": text_cfg.base,
        "pooling": text_cfg.pooling,
        "max_length": text_cfg.max_length,
        "hidden_size": text_cfg.hidden_size,
        "adapter_dim": text_cfg.adapter_dim,
        "template": text_cfg.template,
        "preset": config.preset,
        "keys": "unprefixed nn.Sequential state dict of TextEncoder.adapter (0=LayerNorm, 1 and 3=Linear)",
        "ontology_version": tree.version,
        "split": {"test_fraction": config.test_fraction, "val_fraction": config.val_fraction, "split_seed": config.split_seed, **split.summary()},
        "pairs": pairs.counts(),
        "training": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("output_dir", "cache_dir")},
        "selected_epoch": best_epoch,
        "selected_on": f"{select} top-1",
        "history": [{k: round(v, 4) if isinstance(v, float) else v for k, v in dataclasses.asdict(h).items()} for h in history],
        "figures": figures,
        "seconds": round(time.time() - start, 1),
        "command": command,
    }
    folder = save_text_adapter(trainer.adapter, output_dir or config.output_dir, meta)
    logger.info("wrote the text adapter to %s (epoch %d)", folder, best_epoch)
    return meta


def main(argv: list[str] | None = None) -> int:
    """``python -m unisegtext.training.text_pretrain --config train/text_pretrain.yaml``."""
    import sys

    parser = argparse.ArgumentParser(description="Knowledge pre-training of the UniSegText text adapter (InfoNCE on the knowledge tree).")
    parser.add_argument("--config", type=Path, required=True, help="YAML settings (train/text_pretrain.yaml)")
    parser.add_argument("--output", type=Path, default=None, help="output folder (default: config output_dir)")
    parser.add_argument("--epochs", type=int, default=None, help="override the number of epochs")
    parser.add_argument("--device", default=None, help="override the device (cpu, cuda)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    config = TextPretrainConfig.from_yaml(args.config)
    if args.epochs is not None:
        config.epochs = args.epochs
    if args.device:
        config.device = args.device
    command = "python -m unisegtext.training.text_pretrain " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = train_text_adapter(config, output_dir=args.output, command=command)
    for label in ("base", "knowledge"):
        for name, r in meta["figures"][label].items():
            logger.info("%-10s %-26s top-1 %.3f top-5 %.3f (n=%d)", label, name, r["top1"], r["top5"], r["n"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
