"""A compact, committable training log from a run folder.

    python train/compact_log.py runs/nano3 --out train/logs/unisegtext-nano-v2.csv

One row per logging interval of ``metrics_detail.jsonl`` (every 100 steps) and source: mean
BCE, Dice loss and hard Dice of present prompts, false-positive rate of absent prompts; plus the
whole-volume validation of ``validation.jsonl`` (mean Dice per held-out dataset and per concept)
as rows with ``source = validation:<dataset>``. Optimiser state, checkpoints and caches never
leave the run folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

FIELDS = ["step", "elapsed_min", "source", "patches", "pairs", "bce", "dice_loss", "dice", "false_positive_rate", "detail"]


def rows(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics_detail.jsonl").read_text().splitlines():
        record = json.loads(line)
        for source, v in record["sources"].items():
            out.append({"step": record["step"], "elapsed_min": record.get("elapsed_min"), "source": source,
                        "patches": v.get("patches"), "pairs": v.get("pairs"), "bce": v.get("bce"),
                        "dice_loss": v.get("dice_loss"), "dice": v.get("dice"),
                        "false_positive_rate": v.get("false_positive_rate"), "detail": ""})
    validation = run / "validation.jsonl"
    if validation.is_file():
        for line in validation.read_text().splitlines():
            record = json.loads(line)
            for dataset, v in record["summary"].items():
                out.append({"step": record["step"], "elapsed_min": record.get("elapsed_min"),
                            "source": f"validation:{dataset}", "patches": "", "pairs": "", "bce": "", "dice_loss": "",
                            "dice": v.get("mean_dice"), "false_positive_rate": v.get("absent_with_prediction"),
                            "detail": json.dumps(v.get("concepts", {}), sort_keys=True)})
    return sorted(out, key=lambda r: (int(r["step"]), r["source"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the run folder (metrics_detail.jsonl, validation.jsonl)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    table = rows(args.run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(table)
    print(f"wrote {len(table)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
