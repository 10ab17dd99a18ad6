"""Record in a checkpoint's config.json how many training scans held each concept.

    python train/record_scan_counts.py train/nano_stage9.yaml unisegtext/checkpoints/unisegtext-nano

The trainer writes ``concept_training_scans`` into every model it exports; this fills it in for
a model exported before it did, from the training config of its last stage (its sources and
their cache). Inference then warns for a prompt whose concept was learnt from fewer than
``inference.warn_below_training_scans`` scans. The weights do not change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="the training config (YAML) of the model's last stage")
    parser.add_argument("model", type=Path, help="the checkpoint folder (its config.json is rewritten)")
    args = parser.parse_args(argv)

    from unisegtext.data import load_cache_index
    from unisegtext.errors import ConfigError
    from unisegtext.models.config import UniSegTextConfig, config_from_preset
    from unisegtext.training.config import TrainConfig
    from unisegtext.training.sources import concept_scan_counts, load_sources

    config = TrainConfig.from_yaml(args.config)
    preprocessing = config_from_preset(config.model.preset, **config.model.overrides).preprocessing
    sources = load_sources(load_cache_index(config.data.cache_dir), config.data.sources, preprocessing)
    counts = concept_scan_counts(sources)
    model_config = UniSegTextConfig.from_json(args.model / "config.json")
    if set(counts) != set(model_config.concepts):
        raise ConfigError(f"{args.config} trains {len(counts)} concepts, the model at {args.model} has "
                          f"{len(model_config.concepts)}: this is not its training config")
    model_config.concept_training_scans = counts
    model_config.to_json(args.model / "config.json")
    few = sum(n < model_config.inference.warn_below_training_scans for n in counts.values())
    print(f"{args.model / 'config.json'}: {len(counts)} concepts, {few} learnt from fewer than "
          f"{model_config.inference.warn_below_training_scans} scans")
    return 0


if __name__ == "__main__":
    sys.exit(main())
