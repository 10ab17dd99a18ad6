"""Side by side: an nnU-Net-style specialist vs a UniSegText checkpoint, same data and split.

One command (a) reads the data -- a prepared cache (``unisegtext data prepare``) or a
registered dataset's local copy, harmonised the same way in memory -- and its split, (b) trains
the specialist (MONAI DynUNet with nnU-Net's planned topology and training schedule, see
:mod:`unisegtext.baselines.specialist`) for the given step / wall-clock budget on the training
cases, (c) predicts the held-out cases with both the specialist and the UniSegText checkpoint
(:func:`unisegtext.segment`, prompted with each class's concept id) and scores both with
:func:`unisegtext.evaluation.evaluate_case` on the same reference masks and grid, and (d)
prints one Markdown table (Dice per class, mean over held-out cases; mean over classes).

Give the specialist the same budget the UniSegText checkpoint was trained with (steps of the
same batch/patch budget, or wall-clock time on the same device): the command cannot know how
the checkpoint was trained, so it prints the budget it used and the one you state with
--unisegtext-budget.

nnunetv2 itself is not used: ``pip install --dry-run nnunetv2`` resolves nnunetv2 2.8.1 with
dynamic-network-architectures -> timm -> torchvision 0.29.2 -> torch 2.15.0 and the CUDA 13
wheels, a newer torch than this project supports (2.11 to 2.14). The specialist re-derives
nnU-Net's plan and schedule on MONAI's DynUNet instead (module docstrings say where it differs).

Examples:

    # issue 6: the specialist beside unisegtext-nano on all 64/16 LA scans, compute-matched to
    # nano's 72 min on 2 CPU threads (the planned DynUNet makes 4.45 s/step there -> 970 steps);
    # checkpoints every 100 steps in runs/specialist-dynunet-la/checkpoint; add --resume to continue
    python eval/specialist.py --dataset la_mri_2018 --root ../shared/data/la_mri \\
        --checkpoint unisegtext/checkpoints/unisegtext-nano --max-steps 970 --batch-size 2 \\
        --unisegtext-budget "train/nano.yaml: 2606 steps x 2 patches 64x64x48, 72 min on 2 CPU threads" \\
        --save-specialist runs/specialist-dynunet-la --out eval/results/specialist_la_nano.json

    # LA-MRI (80 cases; 16 validation ids fixed in data_registry/la_mri_2018.yaml), small budget
    python eval/specialist.py --dataset la_mri_2018 --root ../shared/data/la_mri \\
        --checkpoint runs/la/checkpoint --train-limit 8 --val-limit 4 --max-steps 200 --spacing 1.5 1.5 1.5

    # from a prepared cache, 1 hour of specialist training on a GPU
    python eval/specialist.py --cache /cache --dataset la_mri_2018 --checkpoint runs/la/checkpoint \\
        --time-budget-s 3600 --device cuda --mirror --out results/la_specialist.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unisegtext.jsonsafe import json_safe as _json_safe

logger = logging.getLogger("specialist")


def _evaluate_case_fn():
    try:
        from unisegtext.evaluation import evaluate_case
    except ImportError:  # the package's __init__ not written yet: the function lives in metrics
        from unisegtext.evaluation.metrics import evaluate_case
    return evaluate_case


def select_cases(cases, train_ids, val_ids, train_limit, val_limit):
    """Split cases into (train, held-out) by explicit ids or by each case's split."""
    by_id = {c.case: c for c in cases}
    for ids in (train_ids or [], val_ids or []):
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise SystemExit(f"case id(s) {missing} not found; available: {sorted(by_id)[:10]} ...")
    if val_ids:
        held = [by_id[i] for i in val_ids]
    else:
        held = [c for c in cases if c.split in ("validation", "test")]
    held_ids = {c.case for c in held}
    train = [by_id[i] for i in train_ids] if train_ids else [c for c in cases if c.case not in held_ids]
    if set(c.case for c in train) & held_ids:
        raise SystemExit("a case is in both the training and the held-out set")
    train = sorted(train, key=lambda c: c.case)[: train_limit or None]
    held = sorted(held, key=lambda c: c.case)[: val_limit or None]
    if not train or not held:
        raise SystemExit(
            f"{len(train)} training and {len(held)} held-out cases: need both. The dataset has no fixed "
            "validation split here; name the held-out cases with --val-cases"
        )
    return train, held


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not _missing(v)]
    return float(np.mean(finite)) if finite else math.nan


def paired_by_class(per_case: list[dict[str, Any]], classes: Sequence[str]) -> dict[str, dict]:
    """Per class, the specialist against UniSegText on the cases both were scored on (Dice not NaN)."""
    from unisegtext.evaluation import paired_vs_reference

    paired = {}
    for c in classes:
        scored = {m: {r["case"]: r for r in per_case if r["model"] == m and r["class"] == c and not _missing(r["dice"])}
                  for m in ("unisegtext", "specialist")}
        common = sorted(scored["unisegtext"].keys() & scored["specialist"].keys())
        if common:
            paired[c] = paired_vs_reference([scored["unisegtext"][k] for k in common], [scored["specialist"][k] for k in common])
    return paired


def _missing(value: float | None) -> bool:
    return value is None or math.isnan(value)


def markdown_table(rows: list[dict[str, Any]], classes: Sequence[str], n_cases: int) -> str:
    """One row per model: Dice per class (mean over held-out cases), mean over classes."""
    head = ["model", "training", "parameters", *[f"{c} Dice" for c in classes], "mean Dice"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(classes) + 1)) + "|"]
    for row in rows:
        dice = [row["dice"][c] for c in classes]
        cells = [row["model"], row["training"], f"{row['parameters'] / 1e6:.2f} M",
                 *[("n/a" if math.isnan(d) else f"{d:.3f}") for d in dice], f"{_mean(dice):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nDice on {n_cases} held-out case(s), mean over cases (cases where a class is absent in both "
                 "reference and prediction are left out); mean Dice = mean over classes.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("data")
    source.add_argument("--cache", default=None, help="a prepared cache folder (index.json from `unisegtext data prepare`)")
    source.add_argument("--dataset", default=None, help="registry dataset id (required with --root; filters a --cache)")
    source.add_argument("--root", default=None, help="local copy of --dataset, read and harmonised in memory")
    source.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 1.5],
                        help="mm, with --root: the spacing cases are resampled to (default 1.5 1.5 1.5, the cache default)")
    source.add_argument("--classes", nargs="+", default=None, help="concept ids to compare (default: all the dataset annotates)")
    source.add_argument("--train-cases", nargs="+", default=None, help="training case ids (default: all not held out)")
    source.add_argument("--val-cases", nargs="+", default=None, help="held-out case ids (default: the dataset's validation/test split)")
    source.add_argument("--train-limit", type=int, default=None, help="use only the first N training cases (sorted ids)")
    source.add_argument("--val-limit", type=int, default=None, help="evaluate only the first N held-out cases (sorted ids)")
    budget = parser.add_argument_group("budget (the same as the UniSegText checkpoint's)")
    budget.add_argument("--max-steps", type=int, default=None, help="specialist optimiser steps")
    budget.add_argument("--time-budget-s", type=float, default=None, help="specialist training wall-clock seconds")
    budget.add_argument("--unisegtext-budget", default="as trained (state it here)",
                        help="how the checkpoint was trained, printed in its row, e.g. '2000 steps, train/la.yaml'")
    spec = parser.add_argument_group("specialist")
    spec.add_argument("--base-features", type=int, default=32, help="stage-0 channels (nnU-Net: 32)")
    spec.add_argument("--patch-size", type=int, nargs=3, default=None, help="fix the patch (default: nnU-Net's planner)")
    spec.add_argument("--batch-size", type=int, default=None, help="fix the batch size (default: nnU-Net's planner)")
    spec.add_argument("--no-augment", action="store_true", help="train without augmentation")
    spec.add_argument("--mirror", action="store_true", help="test-time mirroring over 8 flips (nnU-Net default; 8x slower)")
    spec.add_argument("--save-specialist", default=None, help="folder to save the trained specialist (plan.json + "
                      "model.safetensors); its checkpoint/ subfolder holds a resumable checkpoint every 100 steps")
    spec.add_argument("--resume", action="store_true", help="continue the training in --save-specialist/checkpoint")
    parser.add_argument("--checkpoint", required=True, help="UniSegText checkpoint folder or Hub id")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the per-case results and the table as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("unisegtext.evaluation").setLevel(logging.WARNING)

    import torch

    from unisegtext import segment
    from unisegtext.baselines.specialist import (
        TrainBudget,
        load_cases_from_cache,
        load_cases_from_registry,
        predict_specialist,
        save_specialist,
        train_specialist,
    )
    from unisegtext.io import Volume
    from unisegtext.models import UniSegText

    if (args.cache is None) == (args.root is None):
        raise SystemExit("give the data as --cache DIR or as --dataset ID --root DIR (one of the two)")
    if args.resume and not args.save_specialist:
        raise SystemExit("--resume continues the checkpoint in --save-specialist DIR; give that folder")
    if args.root is not None and args.dataset is None:
        raise SystemExit("--root needs --dataset (the registry id of that copy, e.g. la_mri_2018)")
    budget = TrainBudget(args.max_steps, args.time_budget_s)

    t0 = time.perf_counter()
    wanted = (args.train_cases or []) + (args.val_cases or [])
    if args.cache:
        cases = load_cases_from_cache(args.cache, args.dataset)
    else:
        cases = load_cases_from_registry(args.dataset, args.root, spacing_mm=args.spacing, cases=wanted or None)
    train, held = select_cases(cases, args.train_cases, args.val_cases, args.train_limit, args.val_limit)
    datasets = sorted({c.dataset for c in train + held})
    classes = args.classes or sorted({t for c in train for t in c.targets})
    unknown = [c for c in classes if not any(c in case.targets for case in held)]
    if unknown:
        raise SystemExit(f"class(es) {unknown} are not annotated in the held-out cases; annotated: "
                         f"{sorted({t for c in held for t in c.targets})}")
    logger.info("data: %s, %d training / %d held-out case(s), classes %s (%.0f s)",
                ", ".join(datasets), len(train), len(held), classes, time.perf_counter() - t0)

    specialist = train_specialist(
        train, classes, budget, device=args.device, base_features=args.base_features,
        patch_size=args.patch_size, batch_size=args.batch_size, augment=not args.no_augment, seed=args.seed,
        checkpoint_dir=Path(args.save_specialist) / "checkpoint" if args.save_specialist else None,
        resume=args.resume,
    )
    logger.info("specialist trained: %d steps in %.0f s", specialist.steps, specialist.train_s)
    if args.save_specialist:
        save_specialist(specialist, args.save_specialist)

    universal = UniSegText.from_pretrained(args.checkpoint, device=torch.device(args.device))
    evaluate_case = _evaluate_case_fn()
    per_case: list[dict[str, Any]] = []
    for case in held:
        reference = {c: case.mask(c) for c in classes}
        t = time.perf_counter()
        spec_masks = predict_specialist(specialist, case.image, device=args.device, mirror=args.mirror)
        spec_s = time.perf_counter() - t
        t = time.perf_counter()
        volume = Volume(array=case.image[0], affine=case.affine, modality=case.modality, source=f"{case.dataset}/{case.case}")
        result = segment(volume, list(classes), model=universal, device=args.device, progress=False)
        uni_s = time.perf_counter() - t
        for name, masks, seconds in (("specialist", spec_masks, spec_s), ("unisegtext", result.masks, uni_s)):
            rows = evaluate_case(masks, reference, case.spacing_mm, case=case.case, dataset=case.dataset, classes=list(classes))
            for row in rows:
                per_case.append({"model": name, "case": case.case, "class": row.class_name, "status": row.status,
                                 "dice": row.dice, "nsd": row.nsd, "hd95_mm": row.hd95_mm, "predict_s": seconds})
        logger.info("%s: specialist %s | unisegtext %s", case.case,
                    ", ".join(f"{r['dice']:.3f}" for r in per_case[-2 * len(classes):-len(classes)]),
                    ", ".join(f"{r['dice']:.3f}" for r in per_case[-len(classes):]))

    def dice_of(model: str) -> dict[str, float]:
        return {c: _mean([r["dice"] for r in per_case if r["model"] == model and r["class"] == c]) for c in classes}

    budget_text = " / ".join(x for x in (f"{args.max_steps} steps" if args.max_steps else "",
                                         f"{args.time_budget_s:g} s" if args.time_budget_s else "") if x)
    rows = [
        {"model": "nnU-Net-style specialist (DynUNet)", "training": f"{specialist.steps} steps, {specialist.train_s:.0f} s "
         f"(budget {budget_text})", "parameters": specialist.parameters, "dice": dice_of("specialist")},
        {"model": f"UniSegText ({universal.config.preset or 'checkpoint'}: {args.checkpoint})",
         "training": args.unisegtext_budget, "parameters": universal.parameter_counts()["stored"], "dice": dice_of("unisegtext")},
    ]
    table = markdown_table(rows, classes, len(held))
    plan = specialist.plan
    footer = (f"Data: {', '.join(datasets)}, {len(train)} training / {len(held)} held-out cases at "
              f"{'x'.join(f'{s:g}' for s in plan.spacing_mm)} mm; specialist patch {plan.patch_size}, batch {plan.batch_size}, "
              f"{plan.num_stages} stages {plan.features}, deep supervision +{plan.deep_supervision_outputs}, "
              f"{'mirroring TTA' if args.mirror else 'no TTA'}; device {args.device}.")
    print()
    print(table)
    print(footer)
    paired = paired_by_class(per_case, classes)
    for c, p in paired.items():
        print(f"specialist vs UniSegText, {c}: specialist higher on {p['better']} of {p['cases']} case(s), "
              f"mean paired difference {100 * p['mean_dice_difference']:+.2f} Dice points")
    report = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "datasets": datasets, "classes": list(classes), "train_cases": [c.case for c in train],
              "held_out_cases": [c.case for c in held], "specialist_plan": plan.to_dict(),
              "specialist_steps": specialist.steps, "specialist_train_s": specialist.train_s,
              "specialist_final_loss": float(np.mean(specialist.losses[-10:])) if specialist.losses else None,
              "rows": rows, "per_case": per_case, "paired": paired, "table_markdown": table, "footer": footer}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_json_safe(report), indent=2, default=str) + "\n")
        print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
