"""Wall time and peak memory of the TotalSegmentator backend on a synthetic CT.

Builds converted TotalSegmentator parts with random weights (timing does not depend on the
weights) and runs the backend's whole path (RAS, resampling to the task spacing, nnU-Net
preprocessing, sliding window per part, merge, back to the input grid) on a synthetic CT
(air at -1000 HU around an elliptic body of soft tissue with noise), by default 512x512x300
voxels at 0.8x0.8x1.5 mm.

The real plans (stages, features, patch size) ship only inside the release zips, which this
script does not download; `--plan assumed` uses a 6-stage PlainConvUNet with features
32-64-128-256-320-320, strides 1,2,2,2,2,2, 3x3x3 kernels, 2 convs per stage and a 128^3
patch (an assumption, not read from the released plans.json: replace the figures once the
weights are at hand, e.g. with `--plans path/to/plans.json`). `--plan tiny` is a smoke test.

    # the full-size run (minutes on 2 CPU cores)
    python benchmarks/totalseg_bench.py --tasks total_fast total --threads 2
    # `total` with organ prompts only runs part 1 of 5
    python benchmarks/totalseg_bench.py --tasks total --max-parts 1 --out benchmarks/results/totalseg_cpu_total_part1.json
    # smoke run (seconds)
    python benchmarks/totalseg_bench.py --size 64 --plan tiny --out /tmp/totalseg_bench_smoke.json

Prints a table and writes JSON (default benchmarks/results/totalseg_cpu.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ASSUMED = {"features": [32, 64, 128, 256, 320, 320], "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "patch": [128, 128, 128],
           "n_conv": 2, "source": "assumed 6-stage plan (not read from the released plans.json)"}
TINY = {"features": [4, 8, 8], "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "patch": [32, 32, 32], "n_conv": 2,
        "source": "tiny smoke-test plan"}
CT_PROPERTIES = {"mean": 100.0, "std": 300.0, "percentile_00_5": -1000.0, "percentile_99_5": 1500.0}


def synthetic_ct(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0):
    from unisegtext.io import Volume

    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape[:2]], indexing="ij")
    body = (grid[0] / 0.8) ** 2 + (grid[1] / 0.6) ** 2 <= 1.0
    array = np.full(shape, -1000.0, dtype=np.float32)
    array[body] = 40.0
    array += rng.normal(0, 20, size=shape).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    return Volume(array, affine, modality="CT", source="synthetic CT")


def plan_from_plans_json(path: Path) -> dict[str, Any]:
    plans = json.loads(path.read_text())
    from unisegtext.backends.totalseg.convert import resolve_configuration
    from unisegtext.backends.totalseg.network import UNetArchitecture

    config = resolve_configuration(plans, "3d_fullres")
    arch = UNetArchitecture.from_plans(config, 1, 2)
    return {"features": arch.features_per_stage, "strides": arch.strides, "patch": config["patch_size"],
            "n_conv": arch.n_conv_per_stage, "kernels": arch.kernel_sizes, "source": str(path)}


def write_random_parts(task_name: str, plan: dict[str, Any], root: Path) -> Path:
    """Converted parts (config.json + model.safetensors) with random weights for every part."""
    from safetensors.torch import save_file

    from unisegtext.backends.totalseg.convert import (
        CONFIG_NAME,
        FORMAT,
        FORMAT_VERSION,
        WEIGHTS_NAME,
    )
    from unisegtext.backends.totalseg.network import PlainConvUNet, UNetArchitecture
    from unisegtext.backends.totalseg.tasks import get_task

    task = get_task(task_name)
    n = len(plan["features"])
    n_conv = plan["n_conv"] if isinstance(plan["n_conv"], list) else [plan["n_conv"]] * n
    spacing_zyx = list(task.resample_mm)[::-1]
    for i, part in enumerate(task.parts):
        arch = UNetArchitecture(1, len(part.classes) + 1, list(plan["features"]), plan.get("kernels", [[3, 3, 3]] * n),
                                [list(s) for s in plan["strides"]], n_conv, n_conv[:-1])
        torch.manual_seed(i)
        network = PlainConvUNet(arch)
        config = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "dataset_name": part.folder, "trainer": part.trainer,
            "plans_name": "nnUNetPlans", "configuration": "3d_fullres", "architecture": arch.to_dict(),
            "preprocessing": {
                "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "spacing": spacing_zyx,
                "patch_size": list(plan["patch"]), "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False], "foreground_intensity_properties_per_channel": {"0": CT_PROPERTIES},
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None},
                "image_reader_writer": "SimpleITKIO", "channel_names": {"0": "CT"},
            },
            "labels": {str(j + 1): name for j, name in enumerate(part.classes)},
            "checkpoint": {"epoch": None, "inference_allowed_mirroring_axes": None},
            "task": task_name, "source_url": "random weights (benchmark)", "version": "random", "licence": "n/a",
        }
        folder = root / part.folder
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(folder / WEIGHTS_NAME))
        (folder / CONFIG_NAME).write_text(json.dumps(config))
    return root


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def run_task(task_name: str, plan: dict[str, Any], volume, workdir: Path, max_parts: int = 0) -> dict[str, Any]:
    from unisegtext.backends.totalseg import backend as backend_module
    from unisegtext.backends.totalseg import nnunet

    weights = write_random_parts(task_name, plan, workdir / task_name)
    backend = backend_module.TotalSegmentatorBackend(task_name, weights=weights, all_parts=True)
    parts = list(backend.task.parts)[:max_parts] if max_parts > 0 else list(backend.task.parts)
    backend.load_parts(parts)
    part_times: dict[str, float] = {}
    windows: dict[str, int] = {}
    original_predict = backend_module.PartModel.predict_labels
    original_steps = nnunet.compute_steps
    current = {"part": ""}

    def timed_predict(self, *args, **kwargs):
        current["part"] = self.dataset_name
        start = time.perf_counter()
        out = original_predict(self, *args, **kwargs)
        part_times[self.dataset_name] = part_times.get(self.dataset_name, 0.0) + time.perf_counter() - start
        return out

    def counted_steps(*args, **kwargs):
        steps = original_steps(*args, **kwargs)
        windows[current["part"]] = windows.get(current["part"], 0) + int(np.prod([len(s) for s in steps]))
        return steps

    backend_module.PartModel.predict_labels = timed_predict
    nnunet.compute_steps = counted_steps
    try:
        start = time.perf_counter()
        labels = backend.predict_labels(volume, parts=parts)
        total = time.perf_counter() - start
    finally:
        backend_module.PartModel.predict_labels = original_predict
        nnunet.compute_steps = original_steps
    params = sum(p.numel() for p in backend._parts[backend.task.parts[0].folder].network().parameters())
    return {
        "task": task_name, "parts": len(parts), "parts_in_task": len(backend.task.parts),
        "spacing_mm": list(backend.task.resample_mm),
        "wall_s": total, "parts_s": part_times, "windows": windows,
        "other_s": total - sum(part_times.values()),
        "params_first_part": params, "labels_shape": list(labels.shape), "peak_rss_gib_so_far": peak_rss_gib(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["total_fast", "total"])
    parser.add_argument("--size", type=int, nargs="+", default=[512, 512, 300],
                        help="volume shape in voxels (one number: a cube)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.5])
    parser.add_argument("--plan", choices=["assumed", "tiny"], default="assumed")
    parser.add_argument("--plans", type=Path, help="a real plans.json (overrides --plan)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-parts", type=int, default=0,
                        help="run only the first N parts of each task (0: all). Part 1 of `total` holds the "
                             "abdominal organs, so this is what organ prompts cost")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "totalseg_cpu.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    shape = tuple(args.size * 3 if len(args.size) == 1 else args.size)
    if len(shape) != 3:
        parser.error("--size takes one or three numbers")
    plan = plan_from_plans_json(args.plans) if args.plans else (ASSUMED if args.plan == "assumed" else TINY)
    volume = synthetic_ct(shape, tuple(args.spacing))
    rows = []
    with tempfile.TemporaryDirectory(prefix="totalseg_bench_") as tmp:
        for task in args.tasks:
            rows.append(run_task(task, plan, volume, Path(tmp), args.max_parts))
            print(f"  {task}: {rows[-1]['wall_s']:.1f} s", file=sys.stderr)

    result = {
        "what": "TotalSegmentator backend, whole path, random weights, synthetic CT",
        "shape": list(shape), "spacing_mm": list(args.spacing), "threads": args.threads,
        "plan": {k: v for k, v in plan.items()}, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"TotalSegmentator backend: {shape} voxels at {tuple(args.spacing)} mm, {args.threads} threads, "
          f"plan: {plan['source']}")
    print(f"{'task':<12} {'parts':>5} {'mm':>5} {'windows':>8} {'networks s':>11} {'other s':>8} {'total s':>8} "
          f"{'peak RSS GiB':>13}")
    for row in rows:
        print(f"{row['task']:<12} {row['parts']:>5} {row['spacing_mm'][0]:>5} {sum(row['windows'].values()):>8} "
              f"{sum(row['parts_s'].values()):>11.1f} {row['other_s']:>8.1f} {row['wall_s']:>8.1f} "
              f"{row['peak_rss_gib_so_far']:>13.2f}")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
