"""Tools for machines: one tool description for LLMs and one dispatcher that answers it.

    >>> from unisegtext.tools import schema, ToolHandler
    >>> tools = schema("anthropic")              # or "openai"; no torch import
    >>> handler = ToolHandler(allowed_root="scans", output_root="out")
    >>> handler.handle("segment", {"scan": "ct.nii.gz", "prompts": ["liver"]})

The MCP server (``unisegtext mcp``) is a thin layer on the same dispatcher. Flow for an
agent: ``list_concepts`` / ``resolve_prompt`` -> inspect -> ``segment`` with concept ids.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from unisegtext.tools.schema import TOOLS, ToolSpec, schema, validate_arguments

_LAZY = {
    "ToolHandler": "unisegtext.tools.handler",
    "ToolLimits": "unisegtext.tools.handler",
    "handle": "unisegtext.tools.handler",
    "ToolInputError": "unisegtext.tools.paths",
    "confine": "unisegtext.tools.paths",
}

__all__ = ["TOOLS", "ToolSpec", "schema", "validate_arguments", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'unisegtext.tools' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
