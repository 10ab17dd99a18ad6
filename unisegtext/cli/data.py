"""`unisegtext data`: list registered datasets, check a local copy, prepare a training cache.

    unisegtext data list
    unisegtext data check /data/la_mri --dataset la_mri_2018
    unisegtext data prepare /data/la_mri --dataset la_mri_2018 --out cache --spacing 1.5 1.5 1.5

``--dataset`` takes a registry id or the path of a descriptor YAML (to try a new one before
it is compiled into the registry).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def add_parser(subparsers) -> None:
    """Register the `data` command (and its list/check/prepare subcommands)."""
    parser = subparsers.add_parser("data", help="dataset registry: list, check, prepare a cache", description=__doc__)
    _configure(parser)


def _configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    p_list = sub.add_parser("list", help="table of registered datasets")
    p_list.add_argument("--registry", help="another compiled registry.json")
    p_list.set_defaults(func=run_list)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("root", help="the folder holding the local copy of the dataset")
        p.add_argument("--dataset", required=True, help="registry id (see `data list`) or a descriptor .yaml")
        p.add_argument("--cases", nargs="+", metavar="CASE", help="only these case ids")
        p.add_argument("--limit", type=int, help="only the first N cases (sorted by id)")

    p_check = sub.add_parser("check", help="compare a local copy with its descriptor")
    common(p_check)
    p_check.add_argument("--no-labels", action="store_true", help="check file presence only (do not read labels)")
    p_check.set_defaults(func=run_check)

    p_prep = sub.add_parser("prepare", help="write the harmonised cache (RAS, one spacing, .npy + index.json)")
    common(p_prep)
    p_prep.add_argument("--out", required=True, help="cache folder (several datasets may share it)")
    spacing = p_prep.add_mutually_exclusive_group()
    spacing.add_argument(
        "--spacing", type=float, nargs=3, default=[1.5, 1.5, 1.5], metavar=("SX", "SY", "SZ"),
        help="target voxel size in mm along R, A, S (default 1.5 1.5 1.5)",
    )
    spacing.add_argument("--native-spacing", action="store_true", help="keep each case's own spacing")
    p_prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_prep.set_defaults(func=run_prepare)


def run_list(args: argparse.Namespace) -> int:
    from unisegtext.data.registry import load_registry

    registry = load_registry(getattr(args, "registry", None))
    header = ("id", "modality", "region", "family", "cases", "targets", "licence")
    rows = [
        (
            d.id,
            "+".join(d.modality),
            d.body_region,
            d.family,
            "?" if d.num_cases is None else str(d.num_cases),
            str(len(d.targets)),
            (d.licence or "not found")[:28],
        )
        for d in sorted(registry.values(), key=lambda d: d.id)
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    mappings = sum(len(d.targets) for d in registry.values())
    concepts = len({c for d in registry.values() for c in d.targets})
    print(
        f"\n{len(registry)} datasets, {mappings} (dataset, label) mappings to {concepts} distinct concepts"
    )
    return 0


def run_check(args: argparse.Namespace) -> int:
    from unisegtext.data.check import check_dataset
    from unisegtext.data.registry import get_descriptor

    descriptor = get_descriptor(args.dataset)
    report = check_dataset(
        descriptor, args.root, cases=args.cases, limit=args.limit, read_labels=not args.no_labels
    )
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def run_prepare(args: argparse.Namespace) -> int:
    from unisegtext.data.prepare import prepare_dataset
    from unisegtext.data.registry import get_descriptor

    descriptor = get_descriptor(args.dataset)
    result = prepare_dataset(
        descriptor,
        args.root,
        args.out,
        spacing=None if args.native_spacing else args.spacing,
        cases=args.cases,
        limit=args.limit,
        progress=not args.no_progress,
    )
    print(
        f"{descriptor.id}: {len(result.written)} written, {len(result.skipped)} skipped (already cached), "
        f"{len(result.failed)} failed; index: {result.index_path}"
    )
    for case, error in result.failed.items():
        print(f"  failed {case}: {error}", file=sys.stderr)
    return 0 if not result.failed else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m unisegtext.cli.data list``."""
    import logging

    from unisegtext.errors import UniSegError

    parser = argparse.ArgumentParser(prog="unisegtext data", description=__doc__)
    _configure(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except UniSegError as exc:
        print(f"unisegtext data: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
