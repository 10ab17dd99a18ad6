"""With and without the SynthSeg-style source, across subjects and modalities (issue 10, 7b).

    python eval/ablation_synthetic.py

Trains the four configs of ``train/ablations/synthetic/`` into ``runs/<config name>`` (a run
whose ``final/model.safetensors`` exists is not trained again; an interrupted one resumes):

    mr_to_ct / mr_to_ct_no_synthetic   train on the example MR subject, score on the CT subject
    ct_to_mr / ct_to_mr_no_synthetic   train on the example CT subject, score on the MR subject

Each pair differs only in the synthetic source (same steps, network, augmentation and seed).
A run is scored on the subject it never saw, through the public pipeline
(``segment(Volume, concept ids)``, masks on that scan's own 3 mm grid), for every concept
annotated in both subjects, with :func:`unisegtext.evaluation.evaluate_masks`. The references
are TotalSegmentator's own labels of the example scans (a pseudo ground truth, see
``../shared/data/totalseg_examples/README.md``), and there is one subject per direction: read
the table as an ablation on two scans, not as a benchmark.

Writes ``--out`` (JSON, per-concept rows) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "train" / "ablations" / "synthetic"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "totalseg_examples"
#: config file -> (training subject, evaluation subject)
RUNS = {
    "mr_to_ct.yaml": ("mr", "ct"),
    "mr_to_ct_no_synthetic.yaml": ("mr", "ct"),
    "ct_to_mr.yaml": ("ct", "mr"),
    "ct_to_mr_no_synthetic.yaml": ("ct", "mr"),
}
TASKS = {"ct": ("ct.nii.gz", "ct_seg.nii.gz", "total", "CT"), "mr": ("mr.nii.gz", "mr_seg.nii.gz", "total_mr", "MR")}


def subject_references(data: Path, subject: str) -> tuple[object, dict[str, np.ndarray], tuple[float, float, float]]:
    """The subject's image as a Volume, concept id -> reference mask (present ones), spacing."""
    import nibabel as nib

    from unisegtext.io import Volume
    from unisegtext.training.sources import totalseg_class_concepts

    image_name, label_name, task, modality = TASKS[subject]
    image = nib.load(str(data / image_name))
    label = np.asarray(nib.load(str(data / label_name)).dataobj).astype(np.int32)
    targets = totalseg_class_concepts(json.loads((data / "classes.json").read_text())[task])
    masks = {concept: np.isin(label, values) for concept, values in targets.items()}
    masks = {c: m for c, m in masks.items() if m.any()}
    volume = Volume(array=np.asarray(image.dataobj, dtype=np.float32), affine=image.affine, modality=modality,
                    source=str(data / image_name))
    spacing = tuple(float(s) for s in np.linalg.norm(image.affine[:3, :3], axis=0))
    return volume, masks, spacing


def score(model_dir: Path, volume, references: dict[str, np.ndarray], spacing, concepts: list[str]) -> list[dict]:
    from unisegtext import segment
    from unisegtext.evaluation import evaluate_masks

    result = segment(volume, concepts, model=str(model_dir), device="cpu", progress=False)
    rows = []
    for concept in concepts:
        m = evaluate_masks(result.masks[concept], references[concept], spacing, 3.0, case="example", class_name=concept)
        rows.append({"concept": concept, "dice": m.dice, "nsd_3mm": m.nsd, "hd95_mm": m.hd95_mm,
                     "ref_volume_ml": m.ref_volume_ml, "pred_volume_ml": m.pred_volume_ml})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the totalseg_examples folder")
    parser.add_argument("--runs", type=Path, default=REPO / "runs", help="where the runs are trained")
    parser.add_argument("--max-steps", type=int, default=0, help="override optim.max_steps of every config")
    parser.add_argument("--only", nargs="+", default=None, help="config file names to run (default: all four)")
    parser.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "ablation_synthetic.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the trainer's step lines

    import torch

    from unisegtext.training import TrainConfig, train

    names = args.only or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {list(RUNS)}")
    subjects = {s: subject_references(args.data, s) for s in ("ct", "mr")}
    shared = sorted(set(subjects["ct"][1]) & set(subjects["mr"][1]))
    print(f"concepts present in both subjects ({len(shared)}): {', '.join(shared)}", file=sys.stderr)

    results = []
    for name in names:
        config = TrainConfig.from_yaml(CONFIGS / name)
        if args.max_steps:
            config.optim.max_steps = args.max_steps
        run = args.runs / config.name
        t0 = time.perf_counter()
        if not (run / "final" / "model.safetensors").is_file():
            train(config, run, resume=(run / "checkpoints" / "latest.json").is_file())
        train_min = (time.perf_counter() - t0) / 60
        torch.set_num_threads(2)
        trained_on, scored_on = RUNS[name]
        volume, references, spacing = subjects[scored_on]
        rows = score(run / "final", volume, references, spacing, shared)
        dice = [r["dice"] for r in rows]
        # the same concepts on the subject it trained on: a fit check that says whether the
        # cross-subject figure is limited by generalisation or by the short training
        fit = score(run / "final", *subjects[trained_on], shared)
        results.append({"config": f"train/ablations/synthetic/{name}", "run": str(run), "trained_on": trained_on,
                        "scored_on": scored_on, "synthetic_prob": config.synthetic.prob,
                        "steps": config.optim.max_steps, "spacing_mm": list(config.model.overrides["preprocessing"]["spacing_mm"]),
                        "train_minutes_this_call": train_min,
                        "dice_mean": float(np.mean(dice)), "rows": rows,
                        "fit_dice_mean": float(np.mean([r["dice"] for r in fit])), "fit_rows": fit})
        print(f"{name}: mean Dice {np.mean(dice) * 100:.1f} % over {len(rows)} concepts", file=sys.stderr)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python eval/ablation_synthetic.py", "shared_concepts": shared,
                                    "results": results}, indent=1, default=float) + "\n")
    print(f"Trained on one subject, scored on the other (Dice %, {len(shared)} concepts present in both; "
          "`python eval/ablation_synthetic.py`):\n")
    head = ["trained on -> scored on", "synthetic source", "steps", "fit: mean Dice on the training subject",
            "mean Dice", *shared]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] * 3 + ["---:"] * (len(shared) + 2)) + "|")
    for r in results:
        by = {row["concept"]: row["dice"] for row in r["rows"]}
        cells = [f"{r['trained_on'].upper()} -> {r['scored_on'].upper()}",
                 "yes" if r["synthetic_prob"] > 0 else "no", str(r["steps"]), f"{r['fit_dice_mean'] * 100:.1f}",
                 f"{r['dice_mean'] * 100:.1f}",
                 *[f"{by[c] * 100:.1f}" for c in shared]]
        print("| " + " | ".join(cells) + " |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
