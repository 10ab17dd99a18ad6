"""Training throughput: patches per second for data, forward+backward, and the whole step.

    python benchmarks/train_throughput.py --config train/nano.yaml --steps 10
    python benchmarks/train_throughput.py --config train/nano.yaml --device cuda --batch-size 4

Uses the run's real pipeline (cache, balanced sampler, MONAI augmentation, synthetic source,
partial-label loss, AdamW) without writing checkpoints. Prints a Markdown table. On a shared
machine the figures depend on the load: report `uptime`'s load average beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "train" / "nano.yaml"))
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: the config's)")
    parser.add_argument("--batch-size", type=int, default=0, help="override sampling.batch_size")
    args = parser.parse_args(argv)

    import torch

    from unisegtext.data import load_cache_index
    from unisegtext.models import config_from_preset
    from unisegtext.training import TrainConfig
    from unisegtext.training.losses import partial_label_loss
    from unisegtext.training.sampling import PatchDataset, PromptTexts, StepBatchSampler, collate
    from unisegtext.training.sources import build_cache, load_sources
    from unisegtext.training.trainer import (
        PromptedSegmentation,
        _parameter_groups,
        build_model,
        seed_everything,
    )

    config = TrainConfig.from_yaml(args.config)
    if args.batch_size:
        config.sampling.batch_size = args.batch_size
    threads = args.threads or config.threads
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device)
    pre = config_from_preset(config.model.preset, **config.model.overrides).preprocessing
    build_cache(config.data.sources, config.data.cache_dir, pre.spacing_mm)
    sources = load_sources(load_cache_index(config.data.cache_dir), config.data.sources, pre)
    concepts = sorted({c for s in sources.values() for c in s.concept_cases})
    annotated = sorted({c for s in sources.values() for case in s.cases for c in case.annotated})
    seed_everything(config.seed)
    model = build_model(config, concepts).to(device).train()
    step_module = PromptedSegmentation(model)
    optimizer = torch.optim.AdamW(_parameter_groups(model, config.optim.weight_decay), lr=config.optim.lr)
    dataset = PatchDataset(sources, config, pre, PromptTexts(annotated, model.config.text.template, config.sampling.synonym_prob))
    sampler = StepBatchSampler(0, args.warmup + args.steps, config.sampling.batch_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    data_s, compute_s, step_s = [], [], []
    for i, indices in enumerate(sampler):
        t0 = time.perf_counter()
        batch = collate([dataset[j] for j in indices]).to(device)
        t1 = time.perf_counter()
        with autocast:
            logits, _, _ = step_module(batch.image, batch.texts)
        loss = partial_label_loss(logits, batch.targets, batch.valid).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if i >= args.warmup:
            data_s.append(t1 - t0)
            compute_s.append(t2 - t1)
            step_s.append(t2 - t0)

    batch_size = config.sampling.batch_size
    patch = "x".join(str(s) for s in pre.patch_size)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    print(f"config {args.config}: preset {config.model.preset}, patch {patch} at {tuple(pre.spacing_mm)} mm, "
          f"batch {batch_size}, {args.steps} timed steps, {hardware}, load average {load:.1f}")
    print()
    print("| part | s / step (median) | patches / s |")
    print("| --- | --- | --- |")
    for name, values in (("data (sample + augment + collate)", data_s), ("forward + backward + AdamW", compute_s), ("whole step", step_s)):
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {batch_size / median:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
