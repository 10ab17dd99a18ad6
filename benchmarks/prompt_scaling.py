"""How inference time grows with the number of prompts on one volume.

The backbone runs once per sliding window for all prompts, so 64 prompts should cost little
more than 1. Prints a table and writes JSON.

    python benchmarks/prompt_scaling.py --preset nano --prompts 1 8 32 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def concept_prompts(n: int, trained: list[str] | None = None) -> list[str]:
    """n distinct concept names: the model's trained concepts first (so every prompt is a
    direct query), then other concepts of the knowledge tree (for untrained models)."""
    from unisegtext.knowledge import load_tree

    tree = load_tree()
    preferred = list(trained or []) or ["liver", "spleen", "kidney_left", "kidney_right", "pancreas", "aorta"]
    if trained and n > len(trained):
        raise SystemExit(f"the model knows {len(trained)} concepts; ask for at most that many prompts")
    ids = preferred + sorted(c for c in tree.concepts if c not in preferred)
    return [tree.get(i).name for i in ids[:n]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volume", default=None, help="scan to segment (default: the bundled example CT)")
    parser.add_argument("--model", default=None, help="checkpoint; default: a random model of --preset")
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/prompt_scaling.json")
    args = parser.parse_args()

    from unisegtext import segment
    from unisegtext.examples import example_path
    from unisegtext.models import UniSegText

    torch.manual_seed(0)
    model = UniSegText.from_pretrained(args.model) if args.model else UniSegText.from_preset(args.preset)
    model = model.eval().to(args.device)
    volume = args.volume or str(example_path("ct"))
    segment(volume, concept_prompts(1, model.config.concepts), model=model, device=args.device, progress=False)  # warm-up

    rows = []
    for n in args.prompts:
        prompts = concept_prompts(n, model.config.concepts)
        times = []
        for _ in range(args.repeats):
            model.clear_text_cache()
            start = time.perf_counter()
            result = segment(volume, prompts, model=model, device=args.device, progress=False)
            times.append(time.perf_counter() - start)
        rows.append({"prompts": n, "median_s": statistics.median(times), "times_s": times,
                     "inference_s": result.timings["inference"]})
    base = rows[0]["median_s"]
    for row in rows:
        row["ratio_to_first"] = row["median_s"] / base
    print(f"volume {volume}, model {args.model or 'random ' + args.preset}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, {args.repeats} repeats (median)")
    print(f"{'prompts':>8} {'median s':>10} {'ratio':>7}")
    for row in rows:
        print(f"{row['prompts']:>8} {row['median_s']:>10.2f} {row['ratio_to_first']:>7.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "machine": platform.processor() or platform.machine(),
                               "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
