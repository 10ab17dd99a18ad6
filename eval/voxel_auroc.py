"""Does the model rank a structure's voxels even where it draws no mask? Voxel AUROC of the
probability map against the reference, and the probability inside vs outside, on one BTCV scan.

    python eval/voxel_auroc.py --case btcv_01      # a training scan (figures in the model card)

The AUROC is computed on a fixed 5 % random subsample of the scan's voxels (seed 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from unisegtext import UniSegText, segment

REPO = Path(__file__).resolve().parents[1]
LABELS = {1: "spleen", 2: "right kidney", 3: "left kidney", 6: "liver", 7: "stomach", 8: "aorta"}  # BTCV dataset.json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="unisegtext-nano")
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "btcv_ct")
    parser.add_argument("--case", default="btcv_01")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = UniSegText.from_pretrained(args.model).eval()
    reference = np.asarray(nib.load(str(args.root / "labelsTr" / f"{args.case}.nii.gz")).dataobj)
    result = segment(args.root / "imagesTr" / f"{args.case}_0000.nii.gz", list(LABELS.values()), model=model,
                     modality="CT", return_probabilities=True, progress=False)
    sample = np.random.default_rng(0).random(reference.shape) < 0.05
    for value, prompt in LABELS.items():
        prob, ref = result.probabilities[prompt], reference == value
        auroc = roc_auc_score(ref[sample], prob[sample])
        print(f"{prompt:14s} voxel AUROC {auroc:.3f}  p inside: mean {prob[ref].mean():.4f}, p99 "
              f"{np.percentile(prob[ref], 99):.3f}  p outside: p99.9 {np.percentile(prob[~ref], 99.9):.4f}  "
              f"mask voxels {int(result.masks[prompt].sum())}, reference {int(ref.sum())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
