"""The default model on real-looking scans: the bundled example CT and a full-size abdominal CT,
20 prompts each, the whole `segment()` pipeline, on the CPU.

    python benchmarks/default_model_bench.py                       # 2 threads, unisegtext-nano
    python benchmarks/default_model_bench.py --threads 2 --repeats 3 --out benchmarks/results/default_model_cpu.json

The full-size scan is the example CT (3 mm) resampled to 512 x 512 x 300 voxels at
0.8 x 0.8 x 1.5 mm (a typical abdominal CT grid, 410 x 410 x 450 mm; trilinear), so the
network sees anatomy, not noise, and the masks come back on the 78.6 M-voxel input grid. Prompts:
20 trained concepts (organs, vessels, bones). Reports the median wall time over --repeats
after one warm-up, the time per stage (read, text, preprocess, inference, postprocess) and the
peak resident memory of the process; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["liver", "spleen", "left kidney", "right kidney", "stomach", "pancreas", "gallbladder", "aorta",
           "inferior vena cava", "portal vein and splenic vein", "esophagus", "left adrenal gland",
           "right adrenal gland", "duodenum", "colon", "urinary bladder", "L1 vertebra", "L3 vertebra",
           "sacrum", "left femur"]


def full_size_ct():
    """The example CT resampled to 512 x 512 x 300 at 0.8 x 0.8 x 1.5 mm (a Volume)."""
    import torch
    import torch.nn.functional as F

    from unisegtext.examples import example_path
    from unisegtext.io import Volume, read_volume

    source = read_volume(example_path("ct"))
    extent = np.array(source.shape) * np.array(source.spacing)
    target = np.array([0.8, 0.8, 1.5])
    shape = (512, 512, 300)
    data = torch.from_numpy(source.array)[None, None]
    resized = F.interpolate(data, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
    affine = source.affine.copy()
    affine[:3, :3] = source.affine[:3, :3] / np.array(source.spacing) * target
    covered = np.array(shape) * target
    def mm(values) -> str:
        return " x ".join(f"{float(v):g}" for v in values)

    return Volume(resized.astype(np.float32), affine, modality="CT",
                  source=f"example CT resampled to {' x '.join(map(str, shape))} at {mm(target)} mm "
                         f"(covers {mm(np.round(covered))} mm; source extent {mm(np.round(extent))} mm)")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux


def run(volume, prompts, model, repeats: int) -> dict:
    from unisegtext import segment

    segment(volume, prompts, model=model, progress=False)  # warm-up (model load, text cache)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        result = segment(volume, prompts, model=model, progress=False)
        runs.append({"seconds": time.perf_counter() - t, "timings": dict(result.timings)})
    seconds = [r["seconds"] for r in runs]
    return {
        "scan": volume.source if hasattr(volume, "source") else str(volume),
        "shape": list(result.volume.shape), "spacing_mm": [round(s, 3) for s in result.volume.spacing],
        "prompts": len(prompts), "median_seconds": statistics.median(seconds), "runs_seconds": seconds,
        "stages_median_seconds": {k: statistics.median(r["timings"].get(k, 0.0) for r in runs)
                                  for k in ("read", "load_model", "text", "preprocess", "inference", "postprocess")},
        "peak_rss_gib_after": peak_rss_gib(),
        "volumes_ml": {p: round(v, 1) for p, v in result.volumes_ml.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unisegtext-nano")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "default_model_cpu.json")
    args = parser.parse_args(argv)

    import torch

    from unisegtext.examples import example_path
    from unisegtext.inference.segment import load_model

    torch.set_num_threads(args.threads)
    net = load_model(args.model, torch.device("cpu"))
    rows = [run(example_path("ct"), PROMPTS, net, args.repeats), run(full_size_ct(), PROMPTS, net, args.repeats)]
    report = {"model": args.model, "weights_sha256": net.weights_sha256, "threads": args.threads,
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "command": "python benchmarks/default_model_bench.py " + " ".join(argv or sys.argv[1:]), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("| scan | input voxels | prompts | median s | inference s | postprocess s | peak RSS (GiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        s = r["stages_median_seconds"]
        print(f"| {r['scan']} | {'x'.join(map(str, r['shape']))} | {r['prompts']} | {r['median_seconds']:.1f} | "
              f"{s['inference']:.1f} | {s['postprocess']:.1f} | {r['peak_rss_gib_after']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
