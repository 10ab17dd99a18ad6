"""Model backends: our own network and peers' published networks behind one interface.

    from unisegtext.backends import get_backend, backend_names
    backend_names()                          # ['totalsegmentator:total', ..., 'unisegtext']
    ts = get_backend("totalsegmentator:total_fast")
    ts.concepts()[:3], ts.licence, ts.contract()["spacing_mm"]
    maps = ts.predict(volume, ["liver", "spleen"])   # {concept id: float32 (X, Y, Z)}

Importing this package loads neither torch nor any weights.
"""

from __future__ import annotations

from unisegtext.backends.base import (
    Backend,
    backend_names,
    concepts_for_class_names,
    get_backend,
    register_backend,
)

__all__ = ["Backend", "backend_names", "concepts_for_class_names", "get_backend", "register_backend"]
