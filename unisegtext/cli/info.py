"""`unisegtext info`: versions, the model and its parameter counts."""

from __future__ import annotations

import argparse
import json
import platform


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="versions, model description and parameter counts")
    p.add_argument("--model", default=None, help="checkpoint folder, Hub repo id or built-in name")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("unisegtext", "torch", "monai", "nibabel", "transformers", "huggingface_hub", "safetensors", "pydicom", "highdicom", "mcp"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from unisegtext.models import UniSegText, builtin_checkpoints, describe

    info = {
        "versions": versions(),
        "cuda": torch.cuda.is_available(),
        "builtin_models": sorted(builtin_checkpoints()),
    }
    info["model"] = describe(UniSegText.from_pretrained(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info["versions"].items():
        print(f"{k:16s} {v}")
    print(f"{'cuda':16s} {info['cuda']}")
    m = info["model"]
    print(f"\nmodel            {m['name']} (preset {m['preset'] or '-'}, head {m['head']})")
    print(f"weights sha256   {m['weights_sha256']}")
    print(f"spacing / patch  {m['spacing_mm']} mm / {m['patch_size']}")
    print(f"trained concepts {len(m['trained_concepts'])}: {', '.join(m['trained_concepts'][:20])}{' ...' if len(m['trained_concepts']) > 20 else ''}")
    print("parameters:")
    for part, n in m["parameters"].items():
        print(f"  {part:22s} {n:>12,d}")
    return 0
