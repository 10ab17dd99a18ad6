"""Inference wall time, peak memory and throughput vs volume size and vs number of prompts.

Runs the whole user-facing pipeline, :func:`unisegtext.segment` (prompt resolution, text
encoding, preprocessing, sliding window, restoring masks to the input grid), on synthetic CT
volumes (random HU values with an affine; timing does not depend on the content) with a model
of the chosen preset (random weights unless --model is given: timing does not depend on the
weights either). Two sweeps:

* size sweep: each --sizes entry with --size-prompts prompts;
* prompt sweep: --prompts counts (default 1 8 32 128) on the --prompt-size volume.

For every run it records the median wall time over --repeats (after a warm-up), the time split
(text, preprocess, inference, postprocess), input voxels/s, the sliding windows run, the
FLOPs and the peak memory. FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode``
on one window (backbone once + the prompt decoder in chunks of ``max_prompts_per_pass``, as the
pipeline runs it) times the number of windows actually run; the text encoder and the
pre/post-processing are not counted. Achieved TFLOP/s = FLOPs / sliding-window time; on CUDA
it is also given as a fraction of --peak-tflops (model FLOP utilisation).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset before each run); on CPU the
process's peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` before
each run, or sampled every 5 ms where that is not allowed) and its rise over the resident size
before the run.

Sizes are ``XxYxZ`` voxels at the model's spacing, or ``XxYxZ@SXxSYxSZ`` with a spacing in mm
(e.g. ``512x512x300@0.8x0.8x1.5``, a typical abdominal CT, which the pipeline resamples to the
model's 1.5 mm grid first). Writes ``OUT.json`` and ``OUT.png`` and prints a table.

    # CPU (under 10 minutes on 2 cores; --time-limit-s skips what would not fit)
    python benchmarks/inference_bench.py --device cpu --out benchmarks/results/inference_cpu
    # CUDA (bf16 autocast; sizes up to a 512x512x300 CT at 1.5 mm, prompts 1..128)
    python benchmarks/inference_bench.py --device cuda --out benchmarks/results/inference_cuda
    # smoke run (tiny model, tiny sizes, seconds)
    python benchmarks/inference_bench.py --quick --out /tmp/bench_quick
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import re
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unisegtext.jsonsafe import json_safe as _json_safe

logger = logging.getLogger("inference_bench")

# NVIDIA H100 SXM5, dense BF16 Tensor Core: the datasheet gives 1,979 TFLOPS "with sparsity",
# half of it without (NVIDIA H100 Tensor Core GPU datasheet, as reproduced at
# https://archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html; 989.4 TFLOPS dense at
# https://glennklockwood.com/garden/processors/h100).
H100_SXM_DENSE_BF16_TFLOPS = 989.4

CPU_SIZES = ["128x128x128", "192x192x192", "512x512x300@0.8x0.8x1.5"]
CUDA_SIZES = ["128x128x128", "192x192x192", "256x256x256", "384x384x300", "512x512x300"]
QUICK_SIZES = ["32x32x32", "48x48x40"]
PROMPT_COUNTS = [1, 8, 32, 128]

_SIZE_RE = re.compile(r"^(\d+)x(\d+)x(\d+)(?:@([\d.]+)x([\d.]+)x([\d.]+))?$")


@dataclass
class SizeSpec:
    """One synthetic volume: shape in voxels, spacing in mm (None = the model's spacing)."""

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float] | None = None

    @classmethod
    def parse(cls, text: str) -> SizeSpec:
        match = _SIZE_RE.match(text.strip().lower())
        if not match:
            raise argparse.ArgumentTypeError(
                f"size {text!r} is not XxYxZ or XxYxZ@SXxSYxSZ (voxels, optional spacing in mm), e.g. 128x128x128 "
                "or 512x512x300@0.8x0.8x1.5"
            )
        shape = tuple(int(v) for v in match.group(1, 2, 3))
        spacing = tuple(float(v) for v in match.group(4, 5, 6)) if match.group(4) else None
        if min(shape) < 1 or (spacing is not None and min(spacing) <= 0):
            raise argparse.ArgumentTypeError(f"size {text!r}: voxels and spacing must be positive")
        return cls(shape, spacing)  # type: ignore[arg-type]

    def label(self) -> str:
        text = "x".join(str(s) for s in self.shape)
        return text if self.spacing_mm is None else text + "@" + "x".join(f"{s:g}" for s in self.spacing_mm)


@dataclass
class RunRecord:
    """One benchmarked configuration (times in s, memory in MiB, FLOPs as counts)."""

    sweep: str
    size: str
    shape: list[int]
    spacing_mm: list[float]
    prompts: int
    input_voxels: int
    model_grid: list[int] = field(default_factory=list)
    model_voxels: int = 0
    windows: int = 0
    median_s: float = math.nan
    times_s: list[float] = field(default_factory=list)
    breakdown_s: dict[str, float] = field(default_factory=dict)
    voxels_per_s: float = math.nan
    model_voxels_per_s: float = math.nan
    flops_per_window: float = math.nan
    total_flops: float = math.nan
    achieved_tflops: float = math.nan
    fraction_of_peak: float | None = None
    peak_memory_mib: float = math.nan
    memory_rise_mib: float = math.nan
    memory_kind: str = ""


# ------------------------------------------------------------------------------------------ memory
class PeakMemory:
    """Peak memory of one block: CUDA allocator peak, or the CPU process's peak RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"
        self.peak_mib = math.nan
        self.rise_mib = math.nan
        self._use_clear_refs = device.type != "cuda" and _can_reset_hwm()
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled_peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _proc_status_kib("VmRSS") * 1024
            if self._use_clear_refs:
                _reset_hwm()
            else:
                self.kind = "cpu_sampled_rss"
                self._sampled_peak = self._base
                self._sampler = threading.Thread(target=self._sample, daemon=True)
                self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled_peak = max(self._sampled_peak, _proc_status_kib("VmRSS") * 1024)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            peak = self._sampled_peak
        else:
            peak = _proc_status_kib("VmHWM") * 1024
        self.peak_mib = peak / 2**20
        self.rise_mib = (peak - self._base) / 2**20


def _proc_status_kib(key: str) -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # "5": reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)


def _can_reset_hwm() -> bool:
    try:
        _reset_hwm()
        return _proc_status_kib("VmHWM") > 0
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ helpers
def concept_prompts(n: int) -> list[str]:
    """`n` distinct concept names that resolve exactly to one non-union concept each.

    Union concepts ("kidney") would expand into several queries and blur the prompt count.
    """
    from unisegtext.knowledge import load_tree

    tree = load_tree()
    preferred = ["liver", "spleen", "kidney_left", "kidney_right", "pancreas", "aorta", "stomach", "gallbladder"]
    ids = [i for i in preferred if i in tree.concepts]
    ids += sorted(c for c in tree.concepts if c not in ids and not tree.get(c).union_of)
    names: list[str] = []
    seen: set[str] = set()
    for concept_id in ids:
        name = tree.get(concept_id).name
        if name.lower() in seen:
            continue
        res = tree.resolve(name)
        if res.concept_id == concept_id and res.confidence >= 0.999:
            names.append(name)
            seen.add(name.lower())
        if len(names) == n:
            return names
    raise SystemExit(f"the knowledge tree has only {len(names)} exactly resolvable concepts, {n} asked for")


def synthetic_ct(spec: SizeSpec, spacing_mm: Sequence[float], seed: int = 0):
    """A CT-like Volume: int16 HU noise in [-1000, 1000] on an RAS diagonal affine."""
    from unisegtext.io import Volume

    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1000, size=spec.shape, dtype=np.int16).astype(np.float32)
    affine = np.diag([*spacing_mm, 1.0]).astype(np.float64)
    return Volume(array=array, affine=affine, modality="CT", source=f"synthetic {spec.label()}")


class WindowCounter:
    """Counts the windows the sliding window runs, by wrapping `model.encode_image`."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.windows = 0
        self.grid: tuple[int, ...] = ()

    def __enter__(self) -> WindowCounter:
        original = self.model.encode_image

        def counted(image: torch.Tensor):
            self.windows += int(image.shape[0])
            return original(image)

        self.model.encode_image = counted  # instance attribute shadows the method
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.model.encode_image


def count_window_flops(model, device: torch.device, prompt_counts: Sequence[int], max_prompts_per_pass: int) -> dict[int, float]:
    """FLOPs of one window (backbone once + decoder per prompt chunk) for each prompt count.

    Counted with FlopCounterMode (matmuls and convolutions; element-wise ops are not counted)
    under the same autocast the pipeline uses.
    """
    import contextlib

    from torch.utils.flop_counter import FlopCounterMode

    patch = tuple(model.config.preprocessing.patch_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    window = torch.zeros((1, model.config.backbone.in_channels, *patch), device=device)
    prompts_needed = max(prompt_counts)
    with torch.inference_mode():
        text = model.encode_text(concept_prompts(prompts_needed)).to(device)
        with autocast:
            with FlopCounterMode(display=False) as counter:
                features = model.encode_image(window)
            backbone = counter.get_total_flops()
            out: dict[int, float] = {}
            for n in sorted(set(prompt_counts)):
                with FlopCounterMode(display=False) as counter:
                    for start in range(0, n, max_prompts_per_pass):
                        model.decode(features, text[start : min(n, start + max_prompts_per_pass)])
                out[n] = float(backbone + counter.get_total_flops())
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(
    model,
    spec: SizeSpec,
    n_prompts: int,
    *,
    device: torch.device,
    repeats: int,
    warmup: bool,
    sweep: str,
    flops_per_window: float,
    peak_tflops: float | None,
    segment_kwargs: dict[str, Any],
) -> RunRecord:
    """Time :func:`unisegtext.segment` on one synthetic volume with `n_prompts` prompts."""
    from unisegtext import segment

    spacing = spec.spacing_mm or tuple(model.config.preprocessing.spacing_mm)
    volume = synthetic_ct(spec, spacing)
    prompts = concept_prompts(n_prompts)
    record = RunRecord(
        sweep=sweep, size=spec.label(), shape=list(spec.shape), spacing_mm=[float(s) for s in spacing],
        prompts=n_prompts, input_voxels=int(np.prod(spec.shape)),
    )
    model_spacing = model.config.preprocessing.spacing_mm
    record.model_grid = [max(1, int(round(n * s / t))) for n, s, t in zip(spec.shape, spacing, model_spacing)]
    record.model_voxels = int(np.prod(record.model_grid))

    def run() -> Any:
        _sync(device)
        result = segment(volume, prompts, model=model, device=device, progress=False, **segment_kwargs)
        _sync(device)
        return result

    if warmup:
        run()
    times: list[float] = []
    splits: list[dict[str, float]] = []
    peak = rise = -math.inf
    kind = ""
    for _ in range(repeats):
        with PeakMemory(device) as memory, WindowCounter(model) as counter:
            start = time.perf_counter()
            result = run()
            times.append(time.perf_counter() - start)
        splits.append(dict(result.timings))
        peak, rise, kind = max(peak, memory.peak_mib), max(rise, memory.rise_mib), memory.kind
        record.windows = counter.windows
        del result
    record.times_s = times
    record.median_s = statistics.median(times)
    record.breakdown_s = {key: statistics.median(s[key] for s in splits) for key in splits[0]}
    record.peak_memory_mib, record.memory_rise_mib, record.memory_kind = peak, rise, kind
    record.voxels_per_s = record.input_voxels / record.median_s
    record.model_voxels_per_s = record.model_voxels / record.median_s
    record.flops_per_window = flops_per_window
    record.total_flops = flops_per_window * record.windows
    inference_s = record.breakdown_s.get("inference", record.median_s)
    record.achieved_tflops = record.total_flops / inference_s / 1e12
    if device.type == "cuda" and peak_tflops:
        record.fraction_of_peak = record.achieved_tflops / peak_tflops
    return record


# ------------------------------------------------------------------------------------------ output
def print_table(records: Sequence[RunRecord], device: torch.device, stream=sys.stdout) -> None:
    mem = "peak GPU MiB" if device.type == "cuda" else "peak RSS MiB"
    head = (f"{'sweep':<7} {'size':<26} {'prompts':>7} {'windows':>7} {'median s':>9} {'infer s':>8} "
            f"{'Mvox/s':>8} {'TFLOP/s':>8} {'of peak':>8} {mem:>13}")
    print(head, file=stream)
    print("-" * len(head), file=stream)
    for r in records:
        frac = f"{100 * r.fraction_of_peak:.1f}%" if r.fraction_of_peak is not None else "-"
        print(
            f"{r.sweep:<7} {r.size:<26} {r.prompts:>7} {r.windows:>7} {r.median_s:>9.2f} "
            f"{r.breakdown_s.get('inference', math.nan):>8.2f} {r.voxels_per_s / 1e6:>8.2f} "
            f"{r.achieved_tflops:>8.3f} {frac:>8} {r.peak_memory_mib:>13.0f}",
            file=stream,
        )


def plot(report: dict[str, Any], path: Path) -> None:
    """Four panels: time and memory vs model-grid voxels, time and memory vs prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size_rows = report["size_sweep"]
    prompt_rows = report["prompt_sweep"]
    mem_label = "peak GPU memory (MiB)" if report["device"].startswith("cuda") else "peak RSS (MiB)"
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    title = (f"UniSegText inference ({report['model']['name']}), {report['device_name']}, "
             f"torch {report['torch']}, {report['settings']['repeats']} repeat(s), median")
    fig.suptitle(title, fontsize=10)

    ax = axes[0, 0]
    if size_rows:
        x = [r["model_voxels"] for r in size_rows]
        ax.plot(x, [r["median_s"] for r in size_rows], "o-", label="total (segment)")
        ax.plot(x, [r["breakdown_s"].get("inference", math.nan) for r in size_rows], "s--", label="sliding window")
        for r in size_rows:
            ax.annotate(r["size"], (r["model_voxels"], r["median_s"]), fontsize=7, textcoords="offset points", xytext=(4, 4))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("voxels at the model spacing")
    ax.set_ylabel("wall time (s)")
    ax.set_title(f"vs volume size ({report['settings']['size_prompts']} prompt(s))", fontsize=9)

    ax = axes[0, 1]
    if size_rows:
        ax.plot([r["model_voxels"] for r in size_rows], [r["peak_memory_mib"] for r in size_rows], "o-")
        ax.set_xscale("log")
    ax.set_xlabel("voxels at the model spacing")
    ax.set_ylabel(mem_label)
    ax.set_title("peak memory vs volume size", fontsize=9)

    ax = axes[1, 0]
    if prompt_rows:
        x = [r["prompts"] for r in prompt_rows]
        ax.plot(x, [r["median_s"] for r in prompt_rows], "o-", label="total (segment)")
        ax.plot(x, [r["breakdown_s"].get("inference", math.nan) for r in prompt_rows], "s--", label="sliding window")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
        ax.set_title(f"vs number of prompts ({prompt_rows[0]['size']})", fontsize=9)
    ax.set_xlabel("prompts")
    ax.set_ylabel("wall time (s)")

    ax = axes[1, 1]
    if prompt_rows:
        ax.plot([r["prompts"] for r in prompt_rows], [r["peak_memory_mib"] for r in prompt_rows], "o-")
        ax.set_xscale("log", base=2)
    ax.set_xlabel("prompts")
    ax.set_ylabel(mem_label)
    ax.set_title("peak memory vs number of prompts", fontsize=9)

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)




# ------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--preset", default="nano", help="size preset of the random model (default: nano)")
    parser.add_argument("--model", default=None, help="a checkpoint folder or Hub id instead of a random --preset model")
    parser.add_argument("--sizes", nargs="+", type=SizeSpec.parse, default=None,
                        help=f"volumes for the size sweep (default on CPU: {' '.join(CPU_SIZES)}; on CUDA: {' '.join(CUDA_SIZES)})")
    parser.add_argument("--size-prompts", type=int, default=1, help="prompts per run in the size sweep (default: 1)")
    parser.add_argument("--prompts", nargs="+", type=int, default=None,
                        help=f"prompt counts of the prompt sweep (default: {' '.join(map(str, PROMPT_COUNTS))})")
    parser.add_argument("--prompt-size", type=SizeSpec.parse, default=None,
                        help="volume of the prompt sweep (default: 96x96x96, one window, on CPU; 256x256x256 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (default: 1 on CPU, 3 on CUDA)")
    parser.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: the model's)")
    parser.add_argument("--sw-batch-size", type=int, default=None, help="windows per forward pass (default: the model's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--peak-tflops", type=float, default=H100_SXM_DENSE_BF16_TFLOPS,
        help=("the GPU's peak dense bf16 TFLOP/s that achieved TFLOP/s are compared with. Default "
              f"{H100_SXM_DENSE_BF16_TFLOPS}: NVIDIA H100 SXM5, dense BF16 Tensor Core, from NVIDIA's H100 datasheet "
              "(1,979 TFLOPS with 2:4 sparsity, half without). Set it for other GPUs from their datasheet "
              "(e.g. H100 PCIe: 756)"),
    )
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="skip the configurations left once this much time has passed (default: 540 on CPU, none on CUDA)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny preset, sizes 32^3 and 48x48x40, prompts 1 and 4, one repeat")
    parser.add_argument("--out", default="benchmarks/results/inference",
                        help="output path without suffix: writes OUT.json and OUT.png (default: benchmarks/results/inference)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    library = logging.getLogger("unisegtext")
    level = library.level
    library.setLevel(logging.ERROR)  # untrained-model and guess warnings are expected here
    try:
        return _main(argv)
    finally:
        library.setLevel(level)  # called in-process (tests): leave the library's logging as it was


def _main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from unisegtext.models import UniSegText

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    on_cuda = device.type == "cuda"
    if args.quick:
        args.preset = "tiny" if args.model is None else args.preset
        sizes = args.sizes or [SizeSpec.parse(s) for s in QUICK_SIZES]
        prompt_counts = args.prompts or [1, 4]
        prompt_size = args.prompt_size or SizeSpec.parse("32x32x32")
        repeats = args.repeats or 1
    else:
        sizes = args.sizes or [SizeSpec.parse(s) for s in (CUDA_SIZES if on_cuda else CPU_SIZES)]
        prompt_counts = args.prompts or PROMPT_COUNTS
        prompt_size = args.prompt_size or SizeSpec.parse("256x256x256" if on_cuda else "96x96x96")
        repeats = args.repeats or (3 if on_cuda else 1)
    time_limit = args.time_limit_s if args.time_limit_s is not None else (None if on_cuda else 540.0)
    if repeats < 1 or args.size_prompts < 1 or min(prompt_counts) < 1:
        raise SystemExit("--repeats, --size-prompts and --prompts must be >= 1")

    torch.manual_seed(0)
    model = UniSegText.from_pretrained(args.model) if args.model else UniSegText.from_preset(args.preset)
    model = model.eval().to(device)
    cfg = model.config
    segment_kwargs: dict[str, Any] = {}
    if args.overlap is not None:
        segment_kwargs["overlap"] = args.overlap
    if args.sw_batch_size is not None:
        segment_kwargs["sw_batch_size"] = args.sw_batch_size
    max_per_pass = cfg.inference.max_prompts_per_pass

    started = time.perf_counter()
    logger.info("counting FLOPs of one %s window ...", "x".join(map(str, cfg.preprocessing.patch_size)))
    flops = count_window_flops(model, device, sorted({args.size_prompts, *prompt_counts}), max_per_pass)

    # one global warm-up (allocator, cuDNN autotuning, text encoder); on CUDA each config warms up too
    bench_one(model, SizeSpec(tuple(cfg.preprocessing.patch_size)), 1, device=device, repeats=1, warmup=False,  # type: ignore[arg-type]
              sweep="warmup", flops_per_window=flops[min(flops)], peak_tflops=None, segment_kwargs=segment_kwargs)

    # the cheap prompt sweep first, then sizes in the given order: a time limit skips the largest
    plan = [("prompts", prompt_size, n) for n in prompt_counts] + [("size", spec, args.size_prompts) for spec in sizes]
    records: list[RunRecord] = []
    skipped: list[dict[str, Any]] = []
    for sweep, spec, n in plan:
        elapsed = time.perf_counter() - started
        if time_limit is not None and elapsed > time_limit:
            skipped.append({"sweep": sweep, "size": spec.label(), "prompts": n,
                            "reason": f"time limit {time_limit:.0f} s reached after {elapsed:.0f} s"})
            logger.info("skipped %s %s, %d prompt(s): time limit", sweep, spec.label(), n)
            continue
        logger.info("%s sweep: %s, %d prompt(s) ...", sweep, spec.label(), n)
        record = bench_one(model, spec, n, device=device, repeats=repeats, warmup=on_cuda, sweep=sweep,
                           flops_per_window=flops[n], peak_tflops=args.peak_tflops, segment_kwargs=segment_kwargs)
        logger.info("  %.2f s (sliding window %.2f s, %d windows), peak %.0f MiB",
                    record.median_s, record.breakdown_s.get("inference", math.nan), record.windows, record.peak_memory_mib)
        records.append(record)

    device_name = torch.cuda.get_device_name(device) if on_cuda else (platform.processor() or platform.machine())
    counts = model.parameter_counts()
    report = {
        "benchmark": "inference",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "model": {"name": args.model or f"random {args.preset}", "preset": cfg.preset, "head": cfg.decoder.head,
                  "patch_size": list(cfg.preprocessing.patch_size), "spacing_mm": list(cfg.preprocessing.spacing_mm),
                  "parameters": counts},
        "settings": {"repeats": repeats, "size_prompts": args.size_prompts, "prompt_counts": list(prompt_counts),
                     "prompt_size": prompt_size.label(), "overlap": segment_kwargs.get("overlap", cfg.inference.overlap),
                     "sw_batch_size": segment_kwargs.get("sw_batch_size", cfg.inference.sw_batch_size),
                     "max_prompts_per_pass": max_per_pass, "autocast": "bf16" if on_cuda else "none (fp32)",
                     "time_limit_s": time_limit, "quick": args.quick},
        "peak_tflops": args.peak_tflops if on_cuda else None,
        "peak_tflops_source": "NVIDIA H100 SXM5 datasheet, dense BF16 (1,979 sparse / 2)" if on_cuda else None,
        "flops_note": ("FlopCounterMode on one window (backbone + prompt decoder chunks) x windows run; "
                       "text encoder, pre/post-processing and element-wise ops not counted"),
        "size_sweep": [asdict(r) for r in records if r.sweep == "size"],
        "prompt_sweep": [asdict(r) for r in records if r.sweep == "prompts"],
        "skipped": skipped,
        "wall_s": time.perf_counter() - started,
    }
    print()
    print(f"{report['model']['name']} on {device} ({device_name}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {repeats}; wall {report['wall_s']:.0f} s")
    print_table(records, device)
    for item in skipped:
        print(f"skipped: {item['sweep']} {item['size']} {item['prompts']} prompt(s) ({item['reason']})")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = Path(f"{out}.json"), Path(f"{out}.png")
    json_path.write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    plot(report, png_path)
    print(f"wrote {json_path} and {png_path}")
    return report


if __name__ == "__main__":
    main()
