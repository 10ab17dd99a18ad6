"""`unisegtext eval`: score predicted masks against reference masks.

    unisegtext eval --pred preds/ --ref labelsTs/ --labels labels.json --tolerance-mm 2 --out eval/
    unisegtext eval --pred out/ --ref case01_seg.nii.gz --labels classes.json --labels-key total
    python -m unisegtext.cli.eval --pred preds/ --ref labelsTs/

Several prediction/reference pairs (e.g. one per dataset) are given by repeating --pred and
--ref (and --dataset / --prob in the same order); summaries then come per dataset and overall.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pred",
        action="append",
        required=True,
        metavar="PATH",
        help="predictions: a folder of cases (case.nii.gz multilabel files or case/<class>.nii.gz "
        "folders), or one case; repeat for several datasets",
    )
    p.add_argument(
        "--ref",
        action="append",
        required=True,
        metavar="PATH",
        help="references: a folder of cases like --pred, or one reference file (single case); "
        "one per --pred",
    )
    p.add_argument(
        "--labels",
        metavar="MAP",
        help='label map for multilabel files on both sides: a JSON file or inline JSON: {"1": "liver", ...}, '
        '{"liver": 1}, nnU-Net dataset.json, or TotalSegmentator classes.json with --labels-key '
        "(default: a labels.json next to each file)",
    )
    p.add_argument("--pred-labels", metavar="MAP", help="label map for the prediction side only")
    p.add_argument("--ref-labels", metavar="MAP", help="label map for the reference side only")
    p.add_argument(
        "--labels-key", metavar="KEY", help="which map of a file holding several (e.g. total)"
    )
    p.add_argument(
        "--prob",
        action="append",
        metavar="DIR",
        help="probability maps for calibration: DIR/case/<class>_prob.nii.gz or DIR/case.npz "
        "(one per --pred when repeated)",
    )
    p.add_argument(
        "--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default 2)"
    )
    p.add_argument(
        "--dataset",
        action="append",
        metavar="NAME",
        help="dataset name per --pred/--ref pair (default: the reference folder's name)",
    )
    p.add_argument("--classes", nargs="+", metavar="NAME", help="evaluate only these classes")
    p.add_argument(
        "--n-bins", type=int, default=15, help="calibration bins (equal width, default 15)"
    )
    p.add_argument(
        "--calibration-margin-mm",
        type=float,
        default=None,
        help="score calibration only near the structure: bounding box of reference OR p>=0.5 "
        "grown by this margin (default: all voxels)",
    )
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="skip reference cases without a prediction instead of failing",
    )
    p.add_argument(
        "--grid-tolerance-mm",
        type=float,
        default=1e-2,
        help="largest affine difference accepted between prediction and reference grids",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="write results.csv, summary.md, results.json (+ reliability PNGs)",
    )
    p.add_argument("--no-plots", action="store_true", help="do not draw reliability diagrams")
    p.add_argument("--quiet", action="store_true", help="do not print the summary")


DESCRIPTION = (
    "Per case and class Dice, normalised surface Dice, HD95 and volume errors, calibration from "
    "probability maps; summaries per class, dataset and overall."
)


def add_parser(subparsers) -> None:
    """Register the `eval` subcommand."""
    p = subparsers.add_parser(
        "eval",
        help="score predicted masks against references (Dice, NSD, HD95, volumes, calibration)",
        description=DESCRIPTION,
    )
    _add_arguments(p)
    p.set_defaults(func=run)


def _per_pair(values: Sequence[str] | None, n: int, option: str) -> list[str | None]:
    from unisegtext.errors import ConfigError

    if not values:
        return [None] * n
    if len(values) == n:
        return list(values)
    raise ConfigError(
        f"{option} was given {len(values)} times for {n} --pred/--ref pair(s); give it once per pair"
    )


def _label_arg(value: str | None):
    """A label-map option: a JSON file, or the JSON object itself ('{"1": "liver"}')."""
    import json

    from unisegtext.errors import ConfigError

    if value is None or not value.lstrip().startswith("{"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f'label map {value!r} is not valid JSON ({exc}); pass a file or e.g. \'{{"1": "liver"}}\''
        ) from None


def run(args: argparse.Namespace) -> int:
    """Run the evaluation described by the parsed arguments; 0 on success."""
    from unisegtext.errors import ConfigError
    from unisegtext.evaluation import EvaluationReport, evaluate_folders

    if len(args.pred) != len(args.ref):
        raise ConfigError(
            f"--pred was given {len(args.pred)} times and --ref {len(args.ref)} times; give one --ref per --pred"
        )
    if args.tolerance_mm < 0:
        raise ConfigError(f"--tolerance-mm must be >= 0, got {args.tolerance_mm}")
    if args.n_bins < 1:
        raise ConfigError(f"--n-bins must be >= 1, got {args.n_bins}")
    n = len(args.pred)
    datasets = _per_pair(args.dataset, n, "--dataset")
    probs = _per_pair(args.prob, n, "--prob")
    report = EvaluationReport()
    for pred, ref, dataset, prob in zip(args.pred, args.ref, datasets, probs):
        report = report + evaluate_folders(
            pred,
            ref,
            labels=_label_arg(args.labels),
            pred_labels=_label_arg(args.pred_labels),
            ref_labels=_label_arg(args.ref_labels),
            labels_key=args.labels_key,
            prob=prob,
            tolerance_mm=args.tolerance_mm,
            dataset=dataset,
            classes=args.classes,
            n_bins=args.n_bins,
            calibration_margin_mm=args.calibration_margin_mm,
            allow_missing=args.allow_missing,
            grid_tolerance_mm=args.grid_tolerance_mm,
        )
    if args.out:
        files = report.save(args.out, plots=not args.no_plots)
        if not args.quiet:
            print(f"wrote {len(files)} file(s) to {args.out}", file=sys.stderr)
    if not args.quiet:
        print(report.to_markdown())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m unisegtext.cli.eval --pred ... --ref ...``."""
    parser = argparse.ArgumentParser(prog="unisegtext eval", description=DESCRIPTION)
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    _add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2), format="%(levelname)s: %(message)s"
    )
    from unisegtext.errors import UniSegError

    try:
        return run(args)
    except (UniSegError, FileNotFoundError) as exc:
        print(f"unisegtext eval: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
