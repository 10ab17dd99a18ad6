"""The MCP server: an in-process MCP client lists the tools and segments the example CT."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("mcp")
anyio = pytest.importorskip("anyio")

from unisegtext.cli.mcp import build_server  # noqa: E402
from unisegtext.tools import schema  # noqa: E402
from unisegtext.tools.handler import ToolHandler  # noqa: E402


@pytest.fixture()
def server_handler(shared_data, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("UNISEGTEXT_MODEL", str(tiny_model_dir))  # the server picks its model from the env
    handler = ToolHandler(shared_data / "totalseg_examples", tmp_path / "out")
    yield handler
    handler.close()


def _run(coroutine_function):
    return anyio.run(coroutine_function)


def test_mcp_client_lists_tools_and_segments_the_example(server_handler, tmp_path):
    from mcp import Client

    server = build_server(server_handler)

    async def session():
        async with Client(server) as client:
            listed = await client.list_tools()
            segmented = await client.call_tool("segment", {"scan": "ct.nii.gz", "prompts": ["liver", "kidney_left"]})
            refused = await client.call_tool("segment", {"scan": "../../etc/passwd", "prompts": ["liver"]})
            unknown = await client.call_tool("segment", {"scan": "ct.nii.gz", "prompts": ["qqqq zzzz"]})
            concepts = await client.call_tool("list_concepts", {"query": "liver", "limit": 3})
            model = await client.call_tool("describe_model", {})
            return listed, segmented, refused, unknown, concepts, model

    listed, segmented, refused, unknown, concepts, model = _run(session)

    tools = {tool.name: tool for tool in listed.tools}
    assert set(tools) == {"segment", "resolve_prompt", "list_concepts", "describe_model"}
    assert tools["segment"].input_schema == schema("anthropic", tool="segment")["input_schema"]
    assert tools["describe_model"].annotations.read_only_hint is True

    assert segmented.is_error is False
    answer = segmented.structured_content
    assert answer == json.loads(segmented.content[0].text)
    assert answer["shape"] == [122, 101, 112] and answer["modality"] == "CT"
    assert [r["concept_id"] for r in answer["results"]] == ["liver", "kidney_left"]
    for result in answer["results"]:
        assert isinstance(result["found"], bool) and result["volume_ml"] >= 0
        assert not Path(result["file"]).is_absolute()  # relative to the output root
        assert (tmp_path / "out" / result["file"]).is_file()
    assert (tmp_path / "out" / answer["files"]["statistics"]).is_file()
    assert str(tmp_path) not in json.dumps(answer)

    assert refused.is_error is True
    assert "outside the data folder" in refused.structured_content["error"]
    assert unknown.is_error is True and unknown.structured_content["suggestions"]
    assert concepts.structured_content["concepts"][0]["id"] == "liver"
    assert model.structured_content["preset"] == "tiny"


def test_cli_has_the_mcp_subcommand():
    from unisegtext.cli import build_parser

    args = build_parser().parse_args(["mcp", "--root", "/data", "--max-prompts", "8", "--timeout", "30"])
    assert args.command == "mcp" and args.root == "/data" and args.max_prompts == 8 and args.timeout == 30.0


@pytest.mark.slow
def test_mcp_over_stdio(shared_data, tiny_model_dir, tmp_path):
    """The real transport: `python -m unisegtext mcp` as a subprocess, spoken to over stdio."""
    from mcp import Client, StdioServerParameters

    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "unisegtext", "mcp", "--root", str(shared_data / "totalseg_examples"),
              "--output", str(tmp_path / "out"), "--model", str(tiny_model_dir)],
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )

    async def session():
        async with Client(params) as client:
            listed = await client.list_tools()
            described = await client.call_tool("describe_model", {})
            return listed, described

    listed, described = _run(session)
    assert {t.name for t in listed.tools} == {"segment", "resolve_prompt", "list_concepts", "describe_model"}
    assert described.structured_content["name"] == tiny_model_dir.name  # never the absolute path
