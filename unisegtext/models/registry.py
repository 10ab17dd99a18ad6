"""Name -> builder registries for backbones and heads (unknown names get 'did you mean')."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from unisegtext.errors import ConfigError, did_you_mean

BACKBONES: dict[str, Callable[..., Any]] = {}
HEADS: dict[str, Callable[..., Any]] = {}


def register_backbone(name: str):
    def wrap(builder):
        BACKBONES[name] = builder
        return builder

    return wrap


def register_head(name: str):
    def wrap(builder):
        HEADS[name] = builder
        return builder

    return wrap


def lookup(table: dict[str, Callable[..., Any]], name: str, kind: str) -> Callable[..., Any]:
    if name not in table:
        raise ConfigError(f"unknown {kind} {name!r}; registered: {sorted(table)}.{did_you_mean(name, list(table))}")
    return table[name]
