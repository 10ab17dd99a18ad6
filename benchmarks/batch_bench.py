"""Cohort throughput: `unisegtext batch` (local, Ray) vs one `unisegtext segment` call per scan.

N copies of the bundled example CT are segmented three ways, each as a fresh command, so every
figure includes what a user waits for (interpreter start, model load, Ray start-up):

* ``batch-local``: ``unisegtext batch --engine local`` (one process, one model load, torch on
  all cores);
* ``segment-cli``: N separate ``unisegtext segment`` calls, one after another (a model load
  per scan);
* ``batch-ray``: ``unisegtext batch --engine ray --workers W`` (a local Ray with W one-CPU
  actors, one model load each).

Prints a table (engine, scans, seconds, scans/minute) and writes JSON.

    python benchmarks/batch_bench.py                          # 16 copies, unisegtext-nano, 2 Ray workers
    python benchmarks/batch_bench.py --copies 2 --model CKPT  # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ("batch-local", "segment-cli", "batch-ray")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=16, help="copies of the example CT (default 16)")
    parser.add_argument("--model", default="unisegtext-nano", help="checkpoint folder or built-in name")
    parser.add_argument("--prompts", nargs="+", default=["liver", "spleen"], help="prompts per scan")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (default 2)")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--work-dir", default=None, help="where the copies and outputs go (default: a temporary folder)")
    parser.add_argument("--out", default="benchmarks/results/batch_cpu.json", help="JSON report")
    return parser


def unisegtext(*args: str) -> list[str]:
    return [sys.executable, "-m", "unisegtext", *args]


def timed(commands: list[list[str]]) -> float:
    """Wall seconds to run `commands` one after another (each must succeed)."""
    start = time.perf_counter()
    for command in commands:
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def ok_rows(table: Path) -> int:
    import csv

    with open(table, newline="") as handle:
        return sum(row["status"] == "ok" for row in csv.DictReader(handle))


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.copies < 1:
        raise SystemExit("--copies must be at least 1")
    import torch

    from unisegtext.examples import example_path

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="batch_bench-"))
    scans = work / "scans"
    scans.mkdir(parents=True, exist_ok=True)
    ids = [f"case{i:03d}" for i in range(args.copies)]
    for case in ids:
        shutil.copyfile(example_path("ct"), scans / f"{case}.nii.gz")
    manifest = work / "cohort.csv"
    manifest.write_text("case_id,input,prompts,modality\n"
                        + "".join(f"{c},scans/{c}.nii.gz,{';'.join(args.prompts)},CT\n" for c in ids))
    model = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    prompt_args = [a for p in args.prompts for a in ("-p", p)]
    plans = {
        "batch-local": [unisegtext("batch", "--manifest", str(manifest), "-o", str(work / "out-local"),
                                   "--model", model, "--device", "cpu", "--quiet")],
        "segment-cli": [unisegtext("segment", "-i", str(scans / f"{c}.nii.gz"), "-o", str(work / "out-cli" / c),
                                   *prompt_args, "--model", model, "--modality", "CT", "--device", "cpu", "--quiet")
                        for c in ids],
        "batch-ray": [unisegtext("batch", "--manifest", str(manifest), "-o", str(work / "out-ray"), "--model", model,
                                 "--engine", "ray", "--workers", str(args.workers), "--device", "cpu", "--quiet")],
    }
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = []
    for engine in args.engines:
        seconds = timed(plans[engine])
        if engine.startswith("batch"):
            table = work / ("out-local" if engine == "batch-local" else "out-ray") / "results.csv"
            if ok_rows(table) != args.copies * len(args.prompts):
                raise SystemExit(f"{engine}: {table} does not list every case as ok")
        rows.append({"engine": engine, "scans": args.copies, "seconds": round(seconds, 2),
                     "scans_per_minute": round(args.copies / seconds * 60, 2),
                     "workers": args.workers if engine == "batch-ray" else 1})
    print(f"{args.copies} copies of the example CT, model {args.model}, prompts {args.prompts}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, load average before {load}")
    print(f"{'engine':<12} {'scans':>6} {'seconds':>9} {'scans/min':>10}")
    for row in rows:
        print(f"{row['engine']:<12} {row['scans']:>6} {row['seconds']:>9.1f} {row['scans_per_minute']:>10.2f}")
    report = {
        "command": "python benchmarks/batch_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "prompts": args.prompts, "copies": args.copies, "ray_workers": args.workers,
        "device": "cpu", "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "ray": _version("ray"), "load_average_before": load, "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _version(package: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
