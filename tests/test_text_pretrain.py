"""Knowledge pre-training of the text adapter and its retrieval evaluation (issue 9, points 5-6)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from unisegtext.errors import ConfigError, ModelLoadError
from unisegtext.knowledge import KnowledgeTree, load_tree
from unisegtext.models.config import config_from_preset
from unisegtext.training.text_pretrain import (
    SynonymSplit,
    TextPretrainConfig,
    _key,
    _Trainer,
    build_adapter,
    build_pairs,
    default_adapter_path,
    hard_negative_ids,
    lateral_counterpart,
    load_text_adapter,
    rank_concepts,
    read_adapter_meta,
    save_text_adapter,
    split_synonyms,
    topk_accuracy,
)

REPO = Path(__file__).resolve().parents[1]
SMALL_IDS = [
    "kidney", "kidney_left", "kidney_right", "adrenal_gland_left", "adrenal_gland_right", "liver", "spleen",
    "pancreas", "vertebra_c6", "vertebra_c7", "vertebra_t1", "vertebra_t2", "vertebra_l5", "sacrum",
    "rib_left_2", "rib_left_3", "rib_left_4", "rib_right_3", "heart_left_atrium", "heart_right_atrium",
]


@pytest.fixture(scope="module")
def tree() -> KnowledgeTree:
    return load_tree()


@pytest.fixture(scope="module")
def small_tree(tree) -> KnowledgeTree:
    return KnowledgeTree({cid: tree.concepts[cid] for cid in SMALL_IDS if cid in tree.concepts}, tree.metadata)


@pytest.fixture(scope="module")
def nano_model():
    from unisegtext.models import UniSegText

    torch.manual_seed(0)
    return UniSegText(config_from_preset("nano")).eval()


# --------------------------------------------------------------------------- adapter files
def test_adapter_layout_matches_the_text_encoder(nano_model):
    cfg = nano_model.config.text
    ours = {k: tuple(v.shape) for k, v in build_adapter(cfg.hidden_size, cfg.adapter_dim).state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in nano_model.text_encoder.adapter.state_dict().items()}
    assert ours == theirs
    # zero-initialised residual: a fresh adapter is the identity
    x = torch.randn(3, cfg.hidden_size)
    adapter = build_adapter(cfg.hidden_size, cfg.adapter_dim)
    assert torch.equal(x + adapter(x), x)


def test_shipped_adapter_loads_into_a_nano_model(nano_model):
    folder = default_adapter_path()
    meta = read_adapter_meta(folder)
    assert meta["adapter_dim"] == config_from_preset("nano").text.adapter_dim
    before = nano_model.encode_text(["left kidney", "right kidney"]).clone()
    try:
        loaded = load_text_adapter(nano_model, folder)
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
        for key, value in nano_model.text_encoder.adapter.state_dict().items():
            assert torch.equal(value, state[key]), key
        after = nano_model.encode_text(["left kidney", "right kidney"])  # the text cache was cleared
        assert not torch.allclose(before, after)
        assert loaded["base"] == nano_model.config.text.base
    finally:
        torch.nn.init.zeros_(nano_model.text_encoder.adapter[-1].weight)
        torch.nn.init.zeros_(nano_model.text_encoder.adapter[-1].bias)
        nano_model.clear_text_cache()


def test_shipped_adapter_beats_the_base_encoder_on_held_out_synonyms():
    figures = read_adapter_meta(default_adapter_path())["figures"]
    for gallery in ("test/names", "test/names+synonyms"):
        assert figures["knowledge"][gallery]["top1"] > figures["base"][gallery]["top1"], gallery
    assert figures["knowledge"]["test/names"]["n"] >= 1000  # a real held-out split, not a handful


def test_loading_refuses_a_mismatched_or_incomplete_adapter(tmp_path, nano_model):
    from unisegtext.models import UniSegText

    good = default_adapter_path()
    tiny = UniSegText(config_from_preset("tiny"), load_text_weights=False)  # adapter_dim 32
    with pytest.raises(ModelLoadError, match="adapter_dim"):
        load_text_adapter(tiny, good)

    wrong_base = tmp_path / "wrong_base"
    shutil.copytree(good, wrong_base)
    meta = json.loads((wrong_base / "meta.json").read_text())
    meta["base"] = "some/other-encoder"
    (wrong_base / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="base"):
        load_text_adapter(nano_model, wrong_base)

    extra = tmp_path / "extra_key"
    adapter = build_adapter(384, 256)
    adapter.add_module("4", torch.nn.Linear(2, 2))  # an unexpected key
    save_text_adapter(adapter, extra, {k: v for k, v in read_adapter_meta(good).items() if k not in ("format", "format_version")})
    with pytest.raises(ModelLoadError, match="unexpected"):
        load_text_adapter(nano_model, extra)

    with pytest.raises(ModelLoadError, match="not a text adapter folder"):
        load_text_adapter(nano_model, tmp_path / "missing")


def test_config_rejects_unknown_keys_and_bad_fractions():
    with pytest.raises(ConfigError, match="did you mean|Did you mean"):
        TextPretrainConfig.from_dict({"temprature": 0.1})
    with pytest.raises(ConfigError, match="below 1"):
        TextPretrainConfig(test_fraction=0.6, val_fraction=0.5)
    cfg = TextPretrainConfig.from_yaml(REPO / "train" / "text_pretrain.yaml")
    assert cfg.text_config().adapter_dim == 256


# --------------------------------------------------------------------------- split and pairs
def test_synonym_split_is_fixed_disjoint_and_never_trained_on(tree):
    split = split_synonyms(tree, 0.15, 0.05, 0)
    again = split_synonyms(tree, 0.15, 0.05, 0)
    assert split.test == again.test and split.val == again.val
    total = len(split.train) + len(split.val) + len(split.test)
    assert 0.12 < len(split.test) / total < 0.18
    held = {_key(s) for _, s in split.test + split.val}
    assert not held & {_key(s) for _, s in split.train}
    pairs = build_pairs(tree, split)
    trained_texts = {_key(pairs.texts[i]) for i in pairs.anchor + pairs.positive}
    assert not held & trained_texts
    assert split_synonyms(tree, 0.15, 0.05, 1).test != split.test  # the seed matters


def test_split_is_stable_when_concepts_are_added(tree, small_tree):
    """Hash-based: a pair's side depends on the pair only, not on the rest of the tree."""
    full = split_synonyms(tree, 0.15, 0.05, 0)
    small = split_synonyms(small_tree, 0.15, 0.05, 0)
    keep = set(SMALL_IDS)
    in_full = {p for p in full.test if p[0] in keep}
    assert in_full and in_full <= set(small.test)


def test_hard_negatives_are_the_confusable_neighbours(tree):
    assert lateral_counterpart("rib_left_3") == "rib_right_3"
    assert lateral_counterpart("heart_left_atrium") == "heart_right_atrium"
    assert lateral_counterpart("liver") == "liver"
    assert "kidney_right" in hard_negative_ids(tree, "kidney_left")[:1]
    c7 = hard_negative_ids(tree, "vertebra_c7")
    assert {"vertebra_c6", "vertebra_t1"} <= set(c7[:3])
    rib = hard_negative_ids(tree, "rib_left_3")
    assert {"rib_right_3", "rib_left_2", "rib_left_4"} <= set(rib[:3])
    l5 = hard_negative_ids(tree, "vertebra_l5")
    assert "sacrum" in l5
    # never an ancestor or descendant (those are positives of the child -> parent pairs)
    assert "kidney" not in hard_negative_ids(tree, "kidney_left")
    assert not set(hard_negative_ids(tree, "kidney")) & {"kidney_left", "kidney_right"}


# --------------------------------------------------------------------------- training and retrieval
def test_a_few_training_epochs_lower_the_loss(small_tree):
    split = split_synonyms(small_tree, 0.0, 0.0, 0)
    pairs = build_pairs(small_tree, split)
    assert pairs.counts()["synonym"] > 20
    torch.manual_seed(0)
    base = torch.randn(len(pairs.texts), 384)
    config = TextPretrainConfig(batch_size=32, lr=3e-3, hard_negatives=2, embedding_dropout=0.0, seed=0)
    trainer = _Trainer(config, pairs, base, 384, 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: extra threads only spin on a shared CPU
    try:
        losses = [trainer.train_epoch() for _ in range(15)]
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < 0.7 * losses[0], losses


def test_rank_concepts_takes_the_best_text_per_concept():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    owner = torch.tensor([0, 1, 1])  # concept 1 has two texts
    query = torch.tensor([[0.6, 0.8], [1.0, 0.05]])
    ranked = rank_concepts(query, gallery, owner, num_concepts=2, k=2)
    assert ranked.tolist() == [[1, 0], [0, 1]]
    acc = topk_accuracy(ranked, [1, 1])
    assert acc["top1"] == 0.5 and acc["top5"] == 1.0 and acc["n"] == 2


def _load_eval_module():
    spec = importlib.util.spec_from_file_location("text_retrieval", REPO / "eval" / "text_retrieval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_retrieval_eval_runs_on_a_small_subset(small_tree, tmp_path):
    text_retrieval = _load_eval_module()
    prompts = [
        (p, e) for p, e in text_retrieval.read_prompt_tsv(REPO / "eval" / "prompts" / "heldout_prompts.tsv")
        if e in small_tree.concepts
    ][:12]
    assert prompts
    result = text_retrieval.retrieval_table(
        small_tree, prompts=prompts, split_part="test", limit=12, cache_dir=tmp_path, with_resolve=True
    )
    table = result["table"]
    assert set(table) == {"held-out synonyms", "free text"}
    for rows in table.values():
        assert {"exact string", "base MiniLM (names)", "knowledge-enhanced (names+syn)"} <= set(rows)
        for scores in rows.values():
            assert 0.0 <= scores["top1"] <= scores["top5"] <= 1.0
    # held-out synonyms are not in the dictionary, so plain lookup never finds them
    assert table["held-out synonyms"]["exact string"]["top1"] == 0.0
    text = text_retrieval.format_table(result)
    assert "knowledge-enhanced (names)" in text and "top-5" in text


def test_empty_split_is_reported_not_crashing():
    split = SynonymSplit(train=[], val=[], test=[])
    assert split.summary()["test"] == 0
    assert topk_accuracy(torch.zeros((0, 5), dtype=torch.long), [])["n"] == 0
