"""Knowledge pre-training of the text adapter (issue 9, point 5).

Same as ``python -m unisegtext.training.text_pretrain``::

    python train/text_pretrain.py --config train/text_pretrain.yaml

Writes ``unisegtext/checkpoints/text_adapter/`` (model.safetensors + meta.json); load it into a
model with ``unisegtext.training.text_pretrain.load_text_adapter(model)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from unisegtext.training.text_pretrain import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
