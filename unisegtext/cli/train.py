"""`unisegtext train`: train or resume a model from a YAML config.

    unisegtext train --config train/nano.yaml --out runs/nano
    unisegtext train --config train/nano.yaml --out runs/nano --resume
    torchrun --nproc_per_node 2 -m unisegtext.train --config train/nano.yaml --out runs/nano
"""

from __future__ import annotations

import argparse
import logging


def add_parser(subparsers) -> None:
    """Register the `train` command."""
    parser = subparsers.add_parser("train", help="train a model from a YAML config", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    parser.set_defaults(func=run)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config YAML (see train/README.md)")
    parser.add_argument("--out", help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    parser.add_argument("--max-steps", type=int, help="stop after this global step (the schedule keeps the config's)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: CUDA when available")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from unisegtext.training import TrainConfig, train

    logging.getLogger("unisegtext").setLevel(logging.INFO)
    config = TrainConfig.from_yaml(args.config)
    if args.no_progress:
        config.logging.progress = False
    out = args.out or f"runs/{config.name}"
    import os

    launcher = "torchrun --nproc_per_node {} -m unisegtext.train".format(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else "unisegtext train"
    command = f"{launcher} --config {args.config} --out {out}"
    result = train(config, out, resume=args.resume, max_steps=args.max_steps, device=args.device, command=command)

    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"trained {result.steps} steps in {result.elapsed_min:.1f} min (stopped by {result.stopped_by}); "
            f"last loss {result.last_loss:.4f}; run folder {result.out_dir}"
            + (f"; model {result.final_dir}" if result.final_dir else "")
            + (f"; exported to {result.export_dir}" if result.export_dir else "")
        )
    return 0
