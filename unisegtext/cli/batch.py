"""`unisegtext batch`: segment a cohort from a manifest, locally or on Ray; resumable."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "batch",
        help="segment a cohort listed in a CSV manifest (local or Ray; resumable)",
        description="Segment every scan of a manifest into OUT/<case_id>/ and write "
                    "OUT/results.csv (one row per case and prompt). Running the same command "
                    "again skips finished cases and retries failed ones. Exit code 0: every "
                    "case finished; 1: some cases failed (see results.csv); 2: bad input.",
    )
    p.add_argument("--manifest", required=True,
                   help="CSV with columns case_id,input,prompts[,modality]; prompts separated by ';', "
                        "inputs relative to the manifest's folder")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process (default); ray: Ray actors (pip install 'unisegtext[ray]')")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray workers, each loading the model once (default: one per CPU, or per GPU)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join: 'auto' for the one started with `ray start` (default: a local Ray)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per Ray worker (fractions share a GPU)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per Ray worker (its torch threads)")
    p.add_argument("--model", default=None, help="checkpoint folder, Hub repo id, or built-in name (default: unisegtext-nano)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="default: cuda if available (local), cuda with --gpus-per-worker else cpu (ray)")
    p.add_argument("--ml", "--multilabel", dest="multilabel", action="store_true",
                   help="one multilabel NIfTI + labels.json per case instead of one file per prompt")
    p.add_argument("--open-vocabulary", action="store_true", help="run unknown prompts on their raw text (with a warning)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from unisegtext.cohort import batch
    from unisegtext.errors import ManifestError

    try:
        summary = batch(
            args.manifest,
            args.output,
            model=args.model,
            engine=args.engine,
            workers=args.workers,
            address=args.address,
            device=args.device,
            cpus_per_worker=args.cpus_per_worker,
            gpus_per_worker=args.gpus_per_worker,
            multilabel=args.multilabel,
            open_vocabulary=args.open_vocabulary,
            progress=not args.quiet,
        )
    except ManifestError as exc:  # one problem per line: the list is what the user works through
        print(f"unisegtext batch: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(json.dumps(summary.to_dict(), indent=2))
    return 0 if summary.ok else 1


if __name__ == "__main__":  # pragma: no cover
    from unisegtext.cli import main

    sys.exit(main(["batch", *sys.argv[1:]]))
