"""Ablations of the nano recipe, scored on the left-atrium validation scans (issue 10, 7b).

    python eval/ablation_la.py                               # every config in train/ablations
    python eval/ablation_la.py --configs train/ablations/la_only.yaml --max-minutes 30

Each config is trained into ``runs/<config name>`` (skipped when ``runs/<name>/final`` exists;
``--max-minutes`` overrides the wall-clock budget for all of them, so compare runs of one
budget on one machine), then evaluated exactly as ``eval/la_validation.py`` does. The
reference row is ``--reference`` (default: the shipped unisegtext-nano checkpoint). Prints a
Markdown table and writes ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval"))

from la_validation import DEFAULT_DATA, DEFAULT_MODEL, evaluate, validation_ids  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", type=Path, default=sorted((REPO / "train" / "ablations").glob("*.yaml")))
    parser.add_argument("--reference", default=str(DEFAULT_MODEL), help="the full recipe's checkpoint")
    parser.add_argument("--max-minutes", type=float, default=0.0, help="override optim.max_minutes of every config")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=0, help="only the first N validation scans")
    parser.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "ablation_la.json")
    args = parser.parse_args(argv)

    from unisegtext.training import TrainConfig, train

    cases = validation_ids()[: args.limit or None]
    rows = [("full recipe (reference)", args.reference)]
    for path in args.configs:
        config = TrainConfig.from_yaml(path)
        if args.max_minutes:
            config.optim.max_minutes = args.max_minutes
        run = REPO / "runs" / config.name
        if not (run / "final" / "model.safetensors").is_file():
            train(config, run, resume=(run / "checkpoints" / "latest.json").is_file())
        rows.append((config.name, str(run / "final")))
    results = []
    for name, model in rows:
        report = evaluate(model, args.data, "left atrium", cases, threads=2)
        results.append({"name": name, "model": model, **report["summary"]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=float) + "\n")
    print(f"Left atrium, {len(cases)} validation scans (original grid), `python eval/ablation_la.py`:\n")
    print("| run | Dice mean (%) | Dice median (%) | HD95 median (mm) |")
    print("| --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['name']} | {r['dice_mean'] * 100:.2f} | {r['dice_median'] * 100:.2f} | {r['hd95_mm_median']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
