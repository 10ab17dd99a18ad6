"""The universal checkpoint beside runs of the same network on the left-atrium validation scans.

Issue 10, 7a -- the universal model vs a left-atrium-only specialist of the same backbone and
budget (train/ablations/la_only.yaml: 2,606 steps x 2 patches, as unisegtext-nano made):

    python eval/ablation_la.py --configs train/ablations/la_only.yaml

Every config in train/ablations/ (adds the no-synonyms and no-synthetic variants of the nano
recipe; each is 2,606 steps, about 70-90 minutes on 2 CPU threads):

    python eval/ablation_la.py

Each config is trained into ``runs/<config name>`` (skipped when ``runs/<name>/final`` exists;
an interrupted run resumes exactly), then evaluated exactly as ``eval/la_validation.py`` does:
``segment(scan, ["left atrium"])`` on the 16 fixed validation scans of
``data_registry/la_mri_2018.yaml``, scored on their original 0.625 mm grid. The reference row
is ``--reference`` (default: the shipped unisegtext-nano checkpoint). Prints a Markdown table
and writes ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval"))

from la_validation import DEFAULT_DATA, DEFAULT_MODEL, evaluate, validation_ids  # noqa: E402

from unisegtext.evaluation import paired_vs_reference  # noqa: E402


def training_summary(run: Path) -> str:
    """'N steps x batch B, M min' from a run's metrics.csv and config (empty if unknown)."""
    import csv

    metrics, config = run / "metrics.csv", run / "train_config.yaml"
    if not metrics.is_file():
        return ""
    rows = list(csv.DictReader(metrics.open()))
    if not rows:
        return ""
    last = rows[-1]
    text = f"{last.get('step', '?')} steps"
    if config.is_file():
        import yaml

        batch = (yaml.safe_load(config.read_text()) or {}).get("sampling", {}).get("batch_size")
        text += f" x batch {batch}" if batch else ""
    minutes = last.get("elapsed_min")
    return text + (f", {float(minutes):.0f} min" if minutes else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", type=Path, default=sorted((REPO / "train" / "ablations").glob("*.yaml")))
    parser.add_argument("--reference", default=str(DEFAULT_MODEL), help="the full recipe's checkpoint")
    parser.add_argument("--reference-training", default="train/nano.yaml: 2606 steps x batch 2, 72 min",
                        help="how the reference was trained (printed in its row)")
    parser.add_argument("--max-minutes", type=float, default=0.0, help="override optim.max_minutes of every config")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=0, help="only the first N validation scans")
    parser.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "ablation_la.json")
    args = parser.parse_args(argv)

    from unisegtext.training import TrainConfig, train

    cases = validation_ids()[: args.limit or None]
    rows = [("unisegtext-nano (universal, reference)", args.reference, args.reference_training)]
    for path in args.configs:
        config = TrainConfig.from_yaml(path)
        if args.max_minutes:
            config.optim.max_minutes = args.max_minutes
        run = REPO / "runs" / config.name
        if not (run / "final" / "model.safetensors").is_file():
            train(config, run, resume=(run / "checkpoints" / "latest.json").is_file())
        rows.append((config.name, str(run / "final"), f"{path.relative_to(REPO) if path.is_absolute() else path}: "
                     + training_summary(run)))
    results = []
    for name, model, training in rows:
        report = evaluate(model, args.data, "left atrium", cases, threads=2)
        results.append({"name": name, "model": model, "training": training, **report["summary"],
                        "per_case": report["per_case"]})
    for r in results[1:]:
        r["paired_vs_reference"] = paired_vs_reference(results[0]["per_case"], r["per_case"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=float) + "\n")
    print(f"Left atrium, {len(cases)} validation scans of la_mri_2018 (original 0.625 mm grid), "
          f"`python eval/ablation_la.py {' '.join(argv if argv is not None else sys.argv[1:])}`:\n")
    print("| model | training | Dice mean +- sd (%) | Dice median (%) | Dice min (%) | NSD 2 mm (%) | HD95 median (mm) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['name']} | {r['training']} | {r['dice_mean'] * 100:.2f} +- {r['dice_std'] * 100:.2f} | "
              f"{r['dice_median'] * 100:.2f} | {r['dice_min'] * 100:.2f} | {r['nsd_2mm_mean'] * 100:.2f} | "
              f"{r['hd95_mm_median']:.2f} |")
    for r in results[1:]:
        paired = r["paired_vs_reference"]
        print(f"\n{r['name']} vs {results[0]['name']}: higher Dice on {paired['better']} of {paired['cases']} scans, "
              f"mean paired difference {paired['mean_dice_difference'] * 100:+.2f} Dice points")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
