"""Multi-organ validation on a registry dataset's fixed validation split (default: BTCV).

    python eval/organ_validation.py --model unisegtext/checkpoints/unisegtext-nano
    python eval/organ_validation.py --dataset btcv_abdomen --root ../shared/data/btcv_ct --update-card

The validation ids are the ``split.validation`` of the dataset's descriptor
(``data_registry/btcv_abdomen.yaml``: 4 of the 24 shared scans, chosen by a fixed rule and
never trained on). Each scan goes through the public pipeline, ``segment(path, prompts,
model=..., modality=<the descriptor's>)``, one prompt per labelled structure (its knowledge-tree
name), so masks come back on the scan's own grid and are scored there against the manual
labels with :func:`unisegtext.evaluation.evaluate_masks` (Dice, NSD at 2 mm, HD95, volumes).

A structure absent from a scan (BTCV's btcv_12 has no gallbladder) does not enter the Dice
means; the table says whether the model drew something there.

Writes ``--out`` (JSON: per case and structure, per-structure means) and prints a Markdown
table; ``--update-card`` puts it between ``<!-- organ-evaluation -->`` markers in the model's
README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "unisegtext" / "checkpoints" / "unisegtext-nano"

#: issue 17's "large organs" of BTCV
LARGE_ORGANS = ["liver", "spleen", "kidney_left", "kidney_right", "stomach", "aorta"]


def structures(descriptor) -> list[tuple[str, list[int]]]:
    """(concept id, label values) of the single structures of a descriptor: targets that are
    not the union of other targets (``kidney`` = left + right is left out: it is scored
    through its members)."""
    targets = {c: sorted(int(v) for v in vals) for c, vals in descriptor.targets.items()}
    out = []
    for concept, values in targets.items():
        covered = [c for c, v in targets.items() if c != concept and set(v) < set(values)]
        if covered:
            continue
        out.append((concept, values))
    return sorted(out, key=lambda cv: cv[1])


def evaluate(model: str, dataset: str, root: Path, cases: list[str] | None, threads: int, overlap: float | None) -> dict:
    import nibabel as nib
    import torch

    from unisegtext import segment
    from unisegtext.data import get_descriptor
    from unisegtext.data.readers import get_reader
    from unisegtext.evaluation import evaluate_masks
    from unisegtext.inference.segment import load_model
    from unisegtext.knowledge import load_tree

    if threads > 0:
        torch.set_num_threads(threads)
    descriptor = get_descriptor(dataset)
    held_out = sorted(descriptor.split.get("validation", []))
    if not held_out:
        raise SystemExit(f"{dataset} has no validation split in its descriptor")
    cases = cases or held_out
    unknown = sorted(set(cases) - set(held_out))
    if unknown:
        raise SystemExit(f"{unknown} are not validation cases of {dataset}: scoring training scans is not validation")
    modality = descriptor.modality[0] if len(descriptor.modality) == 1 else None
    tree = load_tree()
    net = load_model(model, torch.device("cpu"))
    wanted = structures(descriptor)
    prompts = [tree.get(c).name for c, _ in wanted]
    samples = {s.case: s for s in get_reader(descriptor).samples(root, cases=cases)}
    rows = []
    t0 = time.perf_counter()
    for case in cases:
        sample = samples[case]
        label_img = nib.load(str(sample.label_paths[0]))
        label = np.asarray(label_img.dataobj).astype(np.int32)
        spacing = tuple(float(s) for s in np.linalg.norm(label_img.affine[:3, :3], axis=0))
        t = time.perf_counter()
        result = segment(sample.image_paths[0], prompts, model=net, modality=modality, device="cpu", progress=False,
                         overlap=overlap)
        seconds = time.perf_counter() - t
        for (concept, values), prompt in zip(wanted, prompts):
            reference = np.isin(label, values)
            m = evaluate_masks(result.masks[prompt], reference, spacing, 2.0, case=case, class_name=concept, dataset=dataset)
            rows.append({"case": case, "concept": concept, "prompt": prompt, "status": m.status, "dice": m.dice,
                         "nsd_2mm": m.nsd, "hd95_mm": m.hd95_mm, "ref_volume_ml": m.ref_volume_ml,
                         "pred_volume_ml": m.pred_volume_ml})
        line = "  ".join(f"{r['concept']} {r['dice'] * 100:.0f}" for r in rows[-len(wanted):] if not math.isnan(r["dice"]))
        print(f"{case} ({seconds:.1f} s): {line}", file=sys.stderr)
    per_concept = {}
    for concept, _ in wanted:
        mine = [r for r in rows if r["concept"] == concept and r["ref_volume_ml"] > 0]
        absent = [r for r in rows if r["concept"] == concept and r["ref_volume_ml"] == 0]
        hd = [r["hd95_mm"] for r in mine if math.isfinite(r["hd95_mm"])]
        per_concept[concept] = {
            "dice_mean": float(np.mean([r["dice"] for r in mine])) if mine else None,
            "dice_min": float(np.min([r["dice"] for r in mine])) if mine else None,
            "nsd_2mm_mean": float(np.mean([r["nsd_2mm"] for r in mine])) if mine else None,
            "hd95_mm_median": float(np.median(hd)) if hd else None,
            "volume_error_pct_mean": float(np.mean([100 * (r["pred_volume_ml"] - r["ref_volume_ml"]) / r["ref_volume_ml"] for r in mine])) if mine else None,
            "cases": len(mine),
            "absent_cases": len(absent),
            "absent_with_prediction": sum(r["pred_volume_ml"] > 0 for r in absent),
        }
    large = [per_concept[c]["dice_mean"] for c in LARGE_ORGANS if c in per_concept and per_concept[c]["dice_mean"] is not None]
    every = [v["dice_mean"] for v in per_concept.values() if v["dice_mean"] is not None]
    summary = {
        "cases": len(cases),
        "large_organs": [c for c in LARGE_ORGANS if c in per_concept],
        "large_organs_dice_mean": float(np.mean(large)) if large else None,
        "all_structures_dice_mean": float(np.mean(every)) if every else None,
        "structures_below_0.70": sorted(c for c, v in per_concept.items() if v["dice_mean"] is not None and v["dice_mean"] < 0.70),
        "seconds_total": time.perf_counter() - t0,
    }
    return {
        "model": str(model), "weights_sha256": net.weights_sha256, "dataset": dataset, "root": str(root),
        "modality": modality, "cases": cases, "overlap": overlap if overlap is not None else net.config.inference.overlap,
        "grid": "each scan's own grid (segment() restores masks to the input grid)",
        "summary": summary, "per_concept": per_concept, "per_case": rows,
    }


def markdown(report: dict) -> str:
    s = report["summary"]

    def pct(v):
        return "-" if v is None else f"{v * 100:.1f}"

    lines = [
        f"{report['dataset']}: the {s['cases']} fixed validation scans ({', '.join(report['cases'])}; never trained on), "
        f"one prompt per structure, masks on each scan's own grid, "
        f"`python eval/organ_validation.py --dataset {report['dataset']}`:",
        "",
        "| structure | Dice mean (%) | Dice min (%) | NSD 2 mm (%) | HD95 median (mm) | volume error mean (%) | absent: drawn anyway |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for concept, v in report["per_concept"].items():
        hd = "-" if v["hd95_mm_median"] is None else f"{v['hd95_mm_median']:.1f}"
        vol = "-" if v["volume_error_pct_mean"] is None else f"{v['volume_error_pct_mean']:+.1f}"
        absent = f"{v['absent_with_prediction']} of {v['absent_cases']}" if v["absent_cases"] else "-"
        lines.append(f"| {concept} | {pct(v['dice_mean'])} | {pct(v['dice_min'])} | {pct(v['nsd_2mm_mean'])} | {hd} | {vol} | {absent} |")
    lines += [
        "",
        f"Large organs ({', '.join(s['large_organs'])}): mean Dice {pct(s['large_organs_dice_mean'])} %; "
        f"all {len(report['per_concept'])} structures: {pct(s['all_structures_dice_mean'])} %; "
        f"below 70 %: {', '.join(s['structures_below_0.70']) or 'none'}.",
    ]
    return "\n".join(lines)


def update_card(model_dir: Path, text: str, tag: str = "organ-evaluation") -> None:
    card = model_dir / "README.md"
    if not card.is_file():
        print(f"no README.md in {model_dir}; card not updated", file=sys.stderr)
        return
    content = card.read_text()
    block = f"<!-- {tag} -->\n{text}\n<!-- /{tag} -->"
    if f"<!-- {tag} -->" in content:
        content = re.sub(rf"<!-- {tag} -->.*?<!-- /{tag} -->", lambda _: block, content, flags=re.S)
    else:
        content += "\n" + block + "\n"
    card.write_text(content)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint folder or built-in name")
    parser.add_argument("--dataset", default="btcv_abdomen", help="registry id with a validation split")
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "btcv_ct")
    parser.add_argument("--cases", nargs="*", default=None, help="a subset of the validation cases")
    parser.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: the model's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default eval/results/<dataset>_validation.json)")
    parser.add_argument("--update-card", action="store_true", help="write the table into the model's README.md")
    args = parser.parse_args(argv)

    report = evaluate(args.model, args.dataset, args.root, args.cases, args.threads, args.overlap)
    out = args.out or REPO / "eval" / "results" / f"{args.dataset}_validation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from unisegtext.jsonsafe import json_safe

    out.write_text(json.dumps(json_safe(report), indent=1) + "\n")
    text = markdown(report)
    print(text)
    if args.update_card:
        model_dir = Path(args.model)
        if not model_dir.is_dir():
            from unisegtext.models.modeling import resolve_checkpoint

            model_dir = resolve_checkpoint(args.model)
        update_card(model_dir, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
