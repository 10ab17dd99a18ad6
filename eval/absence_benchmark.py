"""Absence benchmark and calibration (issue 19), on the registry's validation splits only.

    python eval/absence_benchmark.py --model unisegtext/checkpoints/unisegtext-nano
    python eval/absence_benchmark.py --fit --write-config       # fit T and presence, store them

How the (scan, prompt, truth) set is built, so anyone can rebuild it:

* scans: the fixed ``split.validation`` of every dataset given with ``--data ID=ROOT`` (default:
  ``btcv_abdomen`` (4 CT scans) and ``la_mri_2018`` (16 LGE-MRI crops)); never a training scan;
* prompts: for each scan, every single structure its dataset labels (targets that are not
  unions of other targets) that the model was trained on: present when the reference has a
  voxel of it, absent when it has none (BTCV's btcv_12 has no gallbladder); plus every concept
  of the dataset's ``outside_field_of_view`` list that the model was trained on (abdominal
  organs on the left-atrium crops): absent;
* a concept the model was never trained on is not asked (that is the model's clear error, not
  an answer about the scan).

Figures: presence AUROC, absent prompts that still get a non-empty mask, present structures
called absent; with ``--fit`` the presence model is fitted leave-one-scan-out (each scan's
figures come from a model fitted on the other scans), and the temperature T is fitted on the
voxels of the validation scans (binary NLL over the region around each labelled structure, the
same region as the ECE), with voxel ECE per dataset before and after. A temperature per modality
is fitted too and stored instead of the single one only where it gives a lower ECE on held-out
scans (leave one scan out) on every dataset. ``--write-config`` stores
T and the presence model fitted on all validation pairs into the checkpoint's config.json (the
weights do not change) and the reliability diagrams next to it; the presence model only where its
leave-one-scan-out error rates are no worse than the shipped decision's on both, or meet both of
issue 19's targets (absent prompts with a mask <= 5 %, present structures called absent <= 2 %)
where the shipped decision misses one (else the config keeps "present = mask not empty"); see
:func:`store_presence_model`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEFAULT_MODEL = REPO / "unisegtext" / "checkpoints" / "unisegtext-nano"
DEFAULT_DATA = {"btcv_abdomen": SHARED / "btcv_ct", "la_mri_2018": SHARED / "la_mri"}
ROI_MARGIN_MM = 10.0


def single_structures(descriptor) -> list[tuple[str, list[int]]]:
    targets = {c: sorted(int(v) for v in vals) for c, vals in descriptor.target_values().items()}
    return [(c, v) for c, v in targets.items() if not any(o != c and set(w) < set(v) for o, w in targets.items())]


def build_pairs(model, data: dict[str, Path]) -> list[dict]:
    """(dataset, case, image, label path, concept, label values, truth) for every pair."""
    from unisegtext.data import get_descriptor
    from unisegtext.data.readers import get_reader

    trained = set(model.config.concepts)
    pairs = []
    for dataset, root in data.items():
        descriptor = get_descriptor(dataset)
        cases = sorted(descriptor.split.get("validation", []))
        samples = {s.case: s for s in get_reader(descriptor).samples(root, cases=cases)}
        modality = descriptor.modality[0] if len(descriptor.modality) == 1 else None
        for case in cases:
            sample = samples[case]
            for concept, values in single_structures(descriptor):
                if concept in trained:
                    pairs.append({"dataset": dataset, "case": case, "image": str(sample.image_paths[0]),
                                  "label": str(sample.label_paths[0]), "modality": modality, "concept": concept,
                                  "values": values, "kind": "labelled"})
            for concept in descriptor.outside_field_of_view:
                if concept in trained:
                    pairs.append({"dataset": dataset, "case": case, "image": str(sample.image_paths[0]),
                                  "label": str(sample.label_paths[0]), "modality": modality, "concept": concept,
                                  "values": [], "kind": "outside_field_of_view"})
    return pairs


def run(model, pairs: list[dict], *, with_voxels: bool) -> tuple[list[dict], dict]:
    """Segment every scan once with all of its prompts; per pair: truth, presence, features,
    mask size; per dataset: voxel logits and labels around the structures (for T and ECE)."""
    import nibabel as nib

    from unisegtext import segment
    from unisegtext.knowledge import load_tree

    tree = load_tree()
    inference = model.config.inference
    by_scan: dict[tuple, list[dict]] = {}
    for pair in pairs:
        by_scan.setdefault((pair["dataset"], pair["case"]), []).append(pair)
    rows, voxels = [], {}
    for (dataset, case), mine in by_scan.items():
        t = time.perf_counter()
        prompts = [tree.get(p["concept"]).name for p in mine]
        result = segment(mine[0]["image"], prompts, model=model, modality=mine[0]["modality"], progress=False,
                         return_probabilities=with_voxels)
        label_img = nib.load(mine[0]["label"])
        label = np.asarray(label_img.dataobj).astype(np.int32)
        spacing = tuple(float(s) for s in np.linalg.norm(label_img.affine[:3, :3], axis=0))
        for pair, prompt in zip(mine, prompts):
            reference = np.isin(label, pair["values"]) if pair["values"] else np.zeros(label.shape, bool)
            rows.append({**{k: pair[k] for k in ("dataset", "case", "concept", "kind")},
                         "truth_present": bool(reference.any()), "presence": float(result.presence[prompt]),
                         "present": bool(result.present[prompt]), "mask_voxels": int(result.masks[prompt].sum()),
                         "features": result.presence_features[prompt]})
            if with_voxels and reference.any():
                from unisegtext.evaluation.calibration import roi_around

                prob = result.probabilities[prompt]
                roi = roi_around(reference, prob, ROI_MARGIN_MM, spacing)
                p = np.clip(prob[roi].astype(np.float64), 1e-6, 1 - 1e-6)
                logits = np.log(p / (1 - p)) * inference.temperature_for(result.modality)  # back to raw logits
                store = voxels.setdefault(dataset, {"logits": [], "labels": [], "cases": [], "modality": result.modality})
                keep = np.random.default_rng(len(store["logits"])).random(logits.size) < min(1.0, 200_000 / logits.size)
                store["logits"].append(logits[keep].astype(np.float32))
                store["labels"].append(reference[roi][keep])
                store["cases"].append(case)
        print(f"{dataset}/{case}: {len(mine)} prompts in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return rows, voxels


def auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve (rank statistic, ties counted half)."""
    pos, neg = scores[truth], scores[~truth]
    if not len(pos) or not len(neg):
        return math.nan
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    i = 0
    while i < len(values):  # average ranks over ties
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def figures(rows: list[dict], scores: np.ndarray, decisions: np.ndarray) -> dict:
    truth = np.array([r["truth_present"] for r in rows])
    masks = np.array([r["mask_voxels"] > 0 for r in rows]) & decisions
    absent = ~truth
    return {
        "pairs": len(rows), "present": int(truth.sum()), "absent": int(absent.sum()),
        "absent_labelled_empty": int(sum(1 for r in rows if not r["truth_present"] and r["kind"] == "labelled")),
        "absent_outside_field_of_view": int(sum(1 for r in rows if r["kind"] == "outside_field_of_view")),
        "auroc": auroc(scores, truth),
        "absent_with_nonempty_mask": float(masks[absent].mean()) if absent.any() else math.nan,
        "present_called_absent": float((~decisions[truth]).mean()) if truth.any() else math.nan,
    }


# issue 19's targets for the two error rates of the presence decision
TARGET_ABSENT_WITH_MASK = 0.05
TARGET_PRESENT_CALLED_ABSENT = 0.02


def store_presence_model(fitted: dict, shipped: dict) -> bool:
    """Whether the fitted presence model (its leave-one-scan-out figures) replaces the shipped
    decision ("present = mask not empty"): where it is no worse on both error rates, or where it
    meets both targets and the shipped decision does not. A model that trades a few more
    present structures called absent for far fewer absent prompts with a mask is then stored
    only while it stays within the target for the former: blanking a present structure is
    the costlier error (the user gets nothing), so it is never traded beyond 2 %."""
    def meets(f: dict) -> bool:
        return (f["absent_with_nonempty_mask"] <= TARGET_ABSENT_WITH_MASK
                and f["present_called_absent"] <= TARGET_PRESENT_CALLED_ABSENT)

    no_worse = (fitted["present_called_absent"] <= shipped["present_called_absent"]
                and fitted["absent_with_nonempty_mask"] <= shipped["absent_with_nonempty_mask"])
    return bool(no_worse or (meets(fitted) and not meets(shipped)))


def leave_one_scan_out(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    from unisegtext.inference.presence import fit_presence, presence_probability

    scans = sorted({(r["dataset"], r["case"]) for r in rows})
    scores, decisions = np.zeros(len(rows)), np.zeros(len(rows), dtype=bool)
    for scan in scans:
        train = [r for r in rows if (r["dataset"], r["case"]) != scan]
        model = fit_presence([r["features"] for r in train], [r["truth_present"] for r in train])
        for i, r in enumerate(rows):
            if (r["dataset"], r["case"]) == scan:
                scores[i] = presence_probability(np.asarray(r["features"]), model)
                decisions[i] = scores[i] >= 0.5 and r["mask_voxels"] > 0
    return scores, decisions


def ece_table(voxels: dict, temperatures: dict[str, float]) -> dict:
    """Voxel ECE and Brier per dataset, each dataset's logits divided by its temperature."""
    from unisegtext.evaluation.calibration import calibration_stats

    out = {}
    for dataset, store in voxels.items():
        logits = np.concatenate(store["logits"]).astype(np.float64)
        labels = np.concatenate(store["labels"])
        stats = calibration_stats(1 / (1 + np.exp(-logits / temperatures[dataset])), labels)
        out[dataset] = {"voxels": int(labels.size), "ece": stats.ece, "brier": stats.brier, "stats": stats}
    return out


def _voxels(voxels: dict, keep) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of every (dataset, case) that `keep` accepts."""
    logits, labels = [], []
    for dataset, store in voxels.items():
        for lg, lb, case in zip(store["logits"], store["labels"], store["cases"]):
            if keep(dataset, store["modality"], case):
                logits.append(lg)
                labels.append(lb)
    if not logits:
        return np.zeros(0), np.zeros(0, dtype=bool)
    return np.concatenate(logits).astype(np.float64), np.concatenate(labels)


def compare_temperatures(voxels: dict) -> dict:
    """One temperature for the model against one per modality, judged leave one scan out: each
    validation scan's voxels are calibrated with temperatures fitted on the other scans, and the
    held-out voxels of each dataset give its ECE. The scheme with the lower held-out ECE on every
    dataset is stored (else the single one: simpler, and fitted on more voxels)."""
    from unisegtext.evaluation.calibration import calibration_stats
    from unisegtext.inference.presence import fit_temperature

    held: dict[str, dict[str, list]] = {}
    for dataset, store in voxels.items():
        for case in sorted(set(store["cases"])):
            test_logits, test_labels = _voxels(voxels, lambda d, m, c: (d, c) == (dataset, case))
            global_t = fit_temperature(*_voxels(voxels, lambda d, m, c: (d, c) != (dataset, case)))
            same = _voxels(voxels, lambda d, m, c: m == store["modality"] and (d, c) != (dataset, case))
            modality_t = fit_temperature(*same) if same[0].size else global_t
            entry = held.setdefault(dataset, {"labels": [], "single": [], "per_modality": []})
            entry["labels"].append(test_labels)
            entry["single"].append(1 / (1 + np.exp(-test_logits / global_t)))
            entry["per_modality"].append(1 / (1 + np.exp(-test_logits / modality_t)))
    out = {}
    for dataset, entry in held.items():
        labels = np.concatenate(entry["labels"])
        out[dataset] = {scheme: calibration_stats(np.concatenate(entry[scheme]), labels).ece
                        for scheme in ("single", "per_modality")}
    per_modality_better = all(v["per_modality"] < v["single"] for v in out.values())
    return {"held_out_ece": out, "chosen": "per_modality" if per_modality_better else "single"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--data", nargs="*", default=None, help="ID=ROOT pairs (default: BTCV and LA in ../shared/data)")
    parser.add_argument("--fit", action="store_true", help="fit the temperature and the presence model (leave-one-scan-out figures)")
    parser.add_argument("--write-config", action="store_true", help="store the fitted T and presence model in the checkpoint")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "absence_benchmark.json")
    args = parser.parse_args(argv)

    import torch

    from unisegtext.inference.presence import fit_presence, fit_temperature
    from unisegtext.inference.segment import load_model
    from unisegtext.jsonsafe import json_safe

    torch.set_num_threads(args.threads)
    data = dict(DEFAULT_DATA) if not args.data else {k: Path(v) for k, v in (item.split("=", 1) for item in args.data)}
    model = load_model(args.model, torch.device("cpu"))
    if args.fit:  # figures and fits start from the uncalibrated model
        model.config.inference.temperature = 1.0
        model.config.inference.presence = {}
    pairs = build_pairs(model, data)
    rows, voxels = run(model, pairs, with_voxels=args.fit)
    report: dict = {"model": args.model, "weights_sha256": model.weights_sha256, "data": {k: str(v) for k, v in data.items()},
                    "rows": rows}
    scores = np.array([r["presence"] for r in rows])
    decisions = np.array([r["present"] for r in rows])
    report["as_shipped"] = figures(rows, scores, decisions)
    if args.fit:
        loso_scores, loso_decisions = leave_one_scan_out(rows)
        report["presence_leave_one_scan_out"] = figures(rows, loso_scores, loso_decisions)
        presence_model = fit_presence([r["features"] for r in rows], [r["truth_present"] for r in rows])
        presence_model.update(threshold=0.5, fitted_on=f"validation splits of {', '.join(data)}: {len(rows)} (scan, prompt) pairs "
                                                      f"({sum(r['truth_present'] for r in rows)} present)")
        temperature = fit_temperature(*_voxels(voxels, lambda d, m, c: True))
        by_modality = {m: fit_temperature(*_voxels(voxels, lambda d, mm, c, m=m: mm == m))
                       for m in sorted({v["modality"] for v in voxels.values()})}
        comparison = compare_temperatures(voxels)
        per_modality = comparison["chosen"] == "per_modality"
        chosen = {d: (by_modality[v["modality"]] if per_modality else temperature) for d, v in voxels.items()}
        before, after = ece_table(voxels, {d: 1.0 for d in voxels}), ece_table(voxels, chosen)
        report["temperature"] = temperature
        report["temperature_by_modality"] = by_modality
        report["temperature_scheme"] = comparison
        report["presence_model"] = presence_model
        report["ece"] = {d: {"voxels": before[d]["voxels"], "before": before[d]["ece"], "after": after[d]["ece"],
                             "brier_before": before[d]["brier"], "brier_after": after[d]["brier"]} for d in before}
        if args.write_config:
            from unisegtext.evaluation.calibration import plot_reliability_diagram
            from unisegtext.models.config import UniSegTextConfig

            folder = Path(args.model)
            config = UniSegTextConfig.from_json(folder / "config.json")
            config.inference.temperature = round(temperature, 4)
            config.inference.temperature_by_modality = ({m: round(t, 4) for m, t in by_modality.items()}
                                                        if per_modality else {})
            # the fitted presence model replaces the shipped decision only where its leave-one-
            # scan-out figures say so (no worse on both rates, or within both targets)
            better = store_presence_model(report["presence_leave_one_scan_out"], report["as_shipped"])
            config.inference.presence = presence_model if better else {}
            report["presence_model_stored"] = bool(better)
            config.to_json(folder / "config.json")
            for dataset in before:
                for tag, table in (("before", before), ("after", after)):
                    plot_reliability_diagram(table[dataset]["stats"], folder / f"reliability_{dataset}_{tag}.png",
                                             title=f"{dataset}, validation voxels, {tag} temperature scaling"
                                                   + (f" (T = {chosen[dataset]:.2f})" if tag == "after" else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json_safe(report), indent=1) + "\n")
    print(json.dumps(json_safe({k: v for k, v in report.items() if k != "rows"}), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
