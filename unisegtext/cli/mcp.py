"""`unisegtext mcp`: serve the segmentation tools to MCP clients over stdio.

A thin layer on :class:`unisegtext.tools.ToolHandler`: the MCP tool list is the tool schema
of :mod:`unisegtext.tools.schema` (``inputSchema`` = the same JSON Schema the OpenAI and
Anthropic views carry) and every call goes through the same dispatcher, so validation, path
confinement, limits and error shapes are identical everywhere. Blocking work runs in a worker
thread, off the event loop.

Example client configuration (Claude Desktop and others)::

    {"mcpServers": {"unisegtext": {"command": "unisegtext",
        "args": ["mcp", "--root", "/data/scans", "--output", "/data/unisegtext-out"]}}}

Needs the official MCP Python SDK, version 2 (``pip install 'mcp>=2'``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from unisegtext.errors import UniSegError

logger = logging.getLogger(__name__)

SERVER_NAME = "unisegtext"
INSTRUCTIONS = (
    "UniSegText segments anatomical structures and lesions in 3D CT and MR scans from text. "
    "Find concept ids with list_concepts or resolve_prompt, check the model with describe_model, "
    "then call segment with the scan path (relative to the data folder) and concept ids. "
    "Results hold volumes, positions (RAS mm) and output file paths; masks stay in files."
)
READ_ONLY_TOOLS = ("resolve_prompt", "list_concepts", "describe_model")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "mcp",
        help="serve segment / resolve_prompt / list_concepts / describe_model over MCP (stdio)",
        description="Run an MCP server on stdin/stdout that exposes UniSegText's tools to LLM clients.",
    )
    p.add_argument("--root", default=None,
                   help="the only folder scans may be read from (default: $UNISEGTEXT_ROOT or the current folder)")
    p.add_argument("--output", default=None,
                   help="where results are written (default: $UNISEGTEXT_OUTPUT or ./unisegtext-output)")
    p.add_argument("--model", default=None,
                   help="checkpoint folder, Hub repo id or built-in name (default: $UNISEGTEXT_MODEL or the built-in model)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "auto"], help="default: cuda if available")
    p.add_argument("--max-prompts", type=int, default=None, help="prompts per segment call (default 32)")
    p.add_argument("--max-file-mb", type=float, default=None, help="largest scan accepted, MB (default 2048)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per segment call (default 600)")
    p.set_defaults(func=run)


def build_server(handler: Any) -> Any:
    """An MCP low-level ``Server`` whose tools are answered by `handler` (a ToolHandler).

    Args:
        handler: a :class:`unisegtext.tools.ToolHandler`.

    Returns:
        ``mcp.server.lowlevel.Server``; run it with ``server.run(read, write,
        server.create_initialization_options())`` or connect an in-process client to it.
    """
    try:
        import anyio
        import mcp.types as types
        from mcp.server.lowlevel import Server
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UniSegError("the MCP server needs the MCP SDK: pip install 'unisegtext[mcp]' ('mcp>=2')") from exc

    from unisegtext import __version__
    from unisegtext.tools.schema import schema

    tools = []
    for view in schema("mcp"):
        read_only = view["name"] in READ_ONLY_TOOLS
        view["annotations"] = types.ToolAnnotations(
            read_only_hint=read_only, destructive_hint=False, idempotent_hint=read_only, open_world_hint=False
        )
        tools.append(types.Tool.model_validate(view))

    async def list_tools(ctx: Any, params: Any) -> Any:
        return types.ListToolsResult(tools=tools)

    async def call_tool(ctx: Any, params: Any) -> Any:
        answer = await anyio.to_thread.run_sync(handler.handle, params.name, dict(params.arguments or {}))
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=json.dumps(answer))],
            structured_content=answer,
            is_error="error" in answer,
        )

    try:
        return Server(SERVER_NAME, version=__version__, instructions=INSTRUCTIONS,
                      on_list_tools=list_tools, on_call_tool=call_tool)
    except TypeError as exc:  # mcp 1.x registers handlers with decorators instead
        raise UniSegError(
            f"this MCP SDK is too old for `unisegtext mcp` ({exc}); upgrade it: pip install 'mcp>=2'"
        ) from exc


def make_handler(args: argparse.Namespace) -> Any:
    """The ToolHandler the server answers with, from CLI flags and environment variables."""
    from unisegtext.tools.handler import ToolHandler, ToolLimits

    limits = ToolLimits()
    if args.max_prompts is not None:
        limits.max_prompts = args.max_prompts
    if args.max_file_mb is not None:
        limits.max_file_mb = args.max_file_mb
    if args.timeout is not None:
        limits.timeout_s = args.timeout
    root = Path(args.root or os.environ.get("UNISEGTEXT_ROOT") or Path.cwd())
    output = Path(args.output or os.environ.get("UNISEGTEXT_OUTPUT") or Path.cwd() / "unisegtext-output")
    return ToolHandler(root, output, limits=limits, model=args.model, device=args.device)


def run(args: argparse.Namespace) -> int:
    import anyio
    from mcp.server.stdio import stdio_server

    handler = make_handler(args)
    server = build_server(handler)
    logger.info("serving UniSegText tools over MCP stdio (root %s, output %s)", handler.allowed_root,
                handler.output_root)

    async def serve() -> None:
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())

    try:
        anyio.run(serve)
    finally:
        handler.close()
    return 0
