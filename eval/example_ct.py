"""What a new user gets from the README's main command, measured (issue 17).

    python eval/example_ct.py --model unisegtext/checkpoints/unisegtext-nano

On the bundled example CT (TotalSegmentator's test scan, full HU range, 3 mm; its reference
labels are TotalSegmentator's own predictions, ``../shared/data/totalseg_examples``):

1. the README command's prompts (liver, spleen, kidney, L1): volume against the reference
   labels' volume, relative error (issue target: liver, spleen and kidneys within 15 %);
2. full range vs soft-tissue window: the same scan clipped to -125..275 HU (as BTCV is stored)
   segmented again; Dice between the two masks per organ (target >= 0.95);
3. fit against the reference labels per organ (Dice). This scan is a TRAINING subject of the
   default model: a fit check, never a generalisation figure.

Also writes the preview PNG a user would look at (``--preview``). Prints Markdown, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "unisegtext" / "checkpoints" / "unisegtext-nano"
REFERENCE = REPO.parent / "shared" / "data" / "totalseg_examples"
README_PROMPTS = ["liver", "spleen", "kidney", "L1"]
ORGANS = ["liver", "spleen", "kidney_left", "kidney_right", "stomach", "aorta"]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return float("nan") if total == 0 else 2.0 * int((a & b).sum()) / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--reference", type=Path, default=REFERENCE, help="the totalseg_examples folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preview", type=Path, default=None, help="write the README command's preview PNG here")
    parser.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "example_ct.json")
    args = parser.parse_args(argv)

    import nibabel as nib
    import torch

    from unisegtext import segment
    from unisegtext.examples import example_path
    from unisegtext.inference.segment import load_model
    from unisegtext.io import Volume, read_volume
    from unisegtext.knowledge import load_tree

    torch.set_num_threads(args.threads)
    tree = load_tree()
    net = load_model(args.model, torch.device("cpu"))
    scan = read_volume(example_path("ct"))
    label = np.asarray(nib.load(str(args.reference / "ct_seg.nii.gz")).dataobj).astype(np.int32)
    classes = {v: int(k) for k, v in json.loads((args.reference / "classes.json").read_text())["total"].items()}
    voxel_ml = scan.voxel_volume_ml

    def reference(concept: str) -> np.ndarray:
        members = tree.get(concept).union_of or (concept,)
        names = [n for m in members for n in tree.get(m).totalseg]
        return np.isin(label, [classes[n] for n in names if n in classes])

    readme = segment(scan, README_PROMPTS, model=net, progress=False)
    volumes = []
    for prompt in README_PROMPTS:
        concept = readme.resolutions[prompt].concept_id
        ref_ml = float(reference(concept).sum()) * voxel_ml
        got = readme.volumes_ml[prompt]
        volumes.append({"prompt": prompt, "concept": concept, "volume_ml": round(got, 1), "reference_ml": round(ref_ml, 1),
                        "error_pct": round(100 * (got - ref_ml) / ref_ml, 1) if ref_ml else None})
    if args.preview:
        readme.write_preview(args.preview)

    names = [tree.get(c).name for c in ORGANS]
    full = segment(scan, names, model=net, modality="CT", progress=False)
    clipped = segment(Volume(np.clip(scan.array, -125, 275), scan.affine, modality="CT", source="example CT clipped"),
                      names, model=net, modality="CT", progress=False)
    window = [{"concept": c, "dice_full_vs_clipped": round(dice(full.masks[n], clipped.masks[n]), 4),
               "fit_dice_full_range": round(dice(full.masks[n], reference(c)), 4),
               "fit_dice_clipped": round(dice(clipped.masks[n], reference(c)), 4)} for c, n in zip(ORGANS, names)]

    report = {"model": args.model, "weights_sha256": net.weights_sha256, "scan": str(example_path("ct")),
              "reference": "TotalSegmentator's own labels of this scan (a training subject of the default model)",
              "readme_command_volumes": volumes, "full_range_vs_clipped": window}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("README command on the bundled CT (`unisegtext segment --example -p liver -p spleen -p kidney -p L1`):\n")
    print("| prompt | volume (mL) | TotalSegmentator reference (mL) | error (%) |\n| --- | --- | --- | --- |")
    for v in volumes:
        print(f"| {v['prompt']} | {v['volume_ml']} | {v['reference_ml']} | {v['error_pct']:+.1f} |"
              if v["error_pct"] is not None else f"| {v['prompt']} | {v['volume_ml']} | {v['reference_ml']} | - |")
    print("\nFull HU range vs the same scan clipped to -125..275 HU (fit Dice: a training subject):\n")
    print("| organ | Dice full vs clipped | fit Dice, full range | fit Dice, clipped |\n| --- | --- | --- | --- |")
    for w in window:
        print(f"| {w['concept']} | {w['dice_full_vs_clipped']:.3f} | {w['fit_dice_full_range']:.3f} | {w['fit_dice_clipped']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
