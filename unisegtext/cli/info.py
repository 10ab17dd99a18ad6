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


def describe_backends(model) -> dict:
    """`info` for backend names ("totalsegmentator:total", "auto", a list): source, version,
    licence and contract of each, without loading any weights."""
    from unisegtext.backends import get_backend
    from unisegtext.inference.routing import NATIVE, _backend_name, _candidates, routing_table

    names = []
    for modality in ("CT", "MR"):
        names += [n for n in _candidates(model, modality) if n not in names]
    backends = {}
    for spec in names:
        if _backend_name(spec) == NATIVE:
            backends[str(spec)] = {"name": NATIVE, "licence": "Apache-2.0", "source": str(spec)}
            continue
        backend = get_backend(spec)
        info = backend.describe()
        ready = getattr(backend, "weights_ready", None)
        info["weights_installed"] = bool(ready()) if ready is not None else True
        backends[spec] = info
    return {"name": model if isinstance(model, str) else list(model), "backends": backends,
            **({"routing": routing_table()} if model == "auto" else {})}


def run(args: argparse.Namespace) -> int:
    import torch

    from unisegtext.inference.routing import is_routed
    from unisegtext.models import UniSegText, builtin_checkpoints, describe

    info = {
        "versions": versions(),
        "cuda": torch.cuda.is_available(),
        "builtin_models": sorted(builtin_checkpoints()),
    }
    if args.model and is_routed(args.model):
        info["model"] = describe_backends(args.model)
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        for name, b in info["model"]["backends"].items():
            print(f"model            {name}")
            print(f"  source         {b.get('source')}")
            print(f"  version        {b.get('version', '-')}")
            print(f"  licence        {b.get('licence')}")
            if "n_concepts" in b:
                print(f"  concepts       {b['n_concepts']} (modality {', '.join(b.get('modalities', []))})")
                print(f"  weights        {'installed' if b.get('weights_installed') else 'not installed (see README: TotalSegmentator weights)'}")
        return 0
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
    few = sorted(c for c, n in m["concept_training_scans"].items() if n < m["warn_below_training_scans"])
    if few:
        print(f"learnt from fewer than {m['warn_below_training_scans']} training scans (rough drafts, warned at "
              f"inference) {len(few)}: {', '.join(few[:12])}{' ...' if len(few) > 12 else ''}")
    print("parameters:")
    for part, n in m["parameters"].items():
        print(f"  {part:22s} {n:>12,d}")
    return 0
