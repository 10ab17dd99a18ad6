"""unisegtext.models: shapes, both heads, presets, strict checkpoints, the Hub."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from unisegtext.errors import ConfigError, ModelLoadError
from unisegtext.models import UniSegText, UniSegTextConfig, config_from_preset


@pytest.fixture(scope="module")
def dynamic_model():
    torch.manual_seed(0)
    return UniSegText.from_preset("tiny", decoder={"head": "dynamic_conv"}).eval()


@pytest.mark.parametrize("head", ["query_decoder", "dynamic_conv"])
def test_forward_shapes_both_heads(head, tiny_model, dynamic_model):
    model = tiny_model if head == "query_decoder" else dynamic_model
    image = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        text = model.encode_text(["liver", "spleen", "left kidney"])
        logits = model(image, text)
        per_sample = model(image, text.unsqueeze(0).expand(2, -1, -1))
    assert logits.shape == (2, 3, 32, 32, 32)
    assert torch.allclose(logits, per_sample, atol=1e-5)


def test_independent_queries_do_not_depend_on_other_prompts(tiny_model):
    image = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        alone = tiny_model(image, tiny_model.encode_text(["liver"]))
        together = tiny_model(image, tiny_model.encode_text(["spleen", "liver", "aorta"]))
    assert torch.allclose(alone[0, 0], together[0, 1], atol=1e-5)


def test_full_self_attention_mixes_prompts():
    torch.manual_seed(0)
    model = UniSegText.from_preset("tiny", decoder={"query_interaction": "full"}).eval()
    image = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        alone = model(image, model.encode_text(["liver"]))
        together = model(image, model.encode_text(["spleen", "liver"]))
    assert not torch.allclose(alone[0, 0], together[0, 1], atol=1e-6)


def test_text_cache_makes_repeats_free(tiny_model, monkeypatch):
    tiny_model.clear_text_cache()
    calls = []
    original = tiny_model.text_encoder.forward
    monkeypatch.setattr(tiny_model.text_encoder, "forward", lambda texts: calls.append(list(texts)) or original(texts))
    with torch.no_grad():
        first = tiny_model.encode_text(["liver", "spleen"])
        again = tiny_model.encode_text(["spleen", "liver", "liver"])
    assert calls == [["liver", "spleen"]]
    assert torch.equal(first[0], again[1])


def test_parameter_counts_and_presets():
    for preset in ("nano", "base"):
        cfg = config_from_preset(preset)
        assert cfg.preset == preset
    counts = UniSegText.from_preset("tiny").parameter_counts()
    assert set(counts) >= {"text_encoder.base", "backbone", "head", "total", "trainable", "stored"}
    assert counts["stored"] == counts["trainable"]  # the frozen base is not stored
    assert counts["total"] == counts["text_encoder.base"] + counts["stored"]


def test_config_rejects_unknown_keys_and_heads():
    with pytest.raises(ConfigError, match="did you mean|Did you mean"):
        UniSegTextConfig.from_dict({"decoder": {"num_layer": 2}})
    with pytest.raises(ConfigError, match="query_decoder"):
        UniSegText(config_from_preset("tiny", decoder={"head": "query_decodr"}))
    with pytest.raises(ConfigError, match="unknown preset"):
        config_from_preset("huge")
    with pytest.raises(ConfigError, match="divisible"):
        config_from_preset("tiny", preprocessing={"patch_size": (30, 32, 32)})


@pytest.mark.parametrize("head", ["query_decoder", "dynamic_conv"])
def test_save_load_identical_logits(tmp_path, head):
    torch.manual_seed(1)
    model = UniSegText.from_preset("tiny", decoder={"head": head}).eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = UniSegText.from_pretrained(tmp_path / "ckpt")
    image = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        a = model(image, model.encode_text(["liver", "spleen"]))
        b = loaded(image, loaded.encode_text(["liver", "spleen"]))
    assert torch.equal(a, b)
    assert len(loaded.weights_sha256) == 64


def test_strict_loading(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    state = load_file(str(bad / "model.safetensors"))
    state.pop(next(iter(state)))
    state["surprise.weight"] = torch.zeros(1)
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="missing keys.*unexpected"):
        UniSegText.from_pretrained(bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="safetensors"):
        UniSegText.from_pretrained(bad)
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["backbone"]["channels"] = [4, 8, 32]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="does not match"):
        UniSegText.from_pretrained(other)


def test_never_unpickles(tmp_path, tiny_model_dir):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        UniSegText.from_pretrained(folder)


def _fill_hub_cache(cache, repo_id, source, commit="0123456789abcdef0123456789abcdef01234567", ref="main"):
    """The on-disk layout huggingface_hub uses for a cached model snapshot."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        shutil.copy2(f, snapshot / f.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / ref).write_text(commit)
    return commit


def test_from_pretrained_hub_cache_offline(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    commit = _fill_hub_cache(cache, "unisegtext/tiny-test", tiny_model_dir)
    model = UniSegText.from_pretrained("unisegtext/tiny-test", cache_dir=cache)
    by_commit = UniSegText.from_pretrained("unisegtext/tiny-test", cache_dir=cache, revision=commit)
    ref = UniSegText.from_pretrained(tiny_model_dir)
    image = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(image, model.encode_text(["liver"])), ref(image, ref.encode_text(["liver"])))
    assert by_commit.weights_sha256 == ref.weights_sha256
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache"):
        UniSegText.from_pretrained("unisegtext/not-cached", cache_dir=cache)
    with pytest.raises(ModelLoadError):
        UniSegText.from_pretrained("unisegtext/tiny-test", cache_dir=cache, revision="v9")


def test_from_pretrained_hub_cache_via_env(tmp_path, tiny_model_dir, monkeypatch):
    """The default cache location (HF_HUB_CACHE) is honoured."""
    cache = tmp_path / "hf"
    _fill_hub_cache(cache, "org/model", tiny_model_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import importlib

    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    importlib.import_module("huggingface_hub")
    assert UniSegText.from_pretrained("org/model").config.preset == "tiny"


def test_bad_model_names(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a folder"):
        UniSegText.from_pretrained("no_such_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        UniSegText.from_pretrained(tmp_path / "empty")


def test_text_cache_survives_eval_but_not_training(tiny_model):
    tiny_model.clear_text_cache()
    with torch.no_grad():
        tiny_model.encode_text(["liver"])
    tiny_model.eval()
    assert len(tiny_model._text_cache) == 1
    tiny_model.train()
    assert len(tiny_model._text_cache) == 0
    tiny_model.eval()
