"""The tool descriptions an LLM sees, written once and exported per provider.

One JSON Schema per tool, shared by every view: OpenAI function calling
(``{"type": "function", "function": {...}}``), Anthropic tool use
(``{"name", "description", "input_schema"}``) and MCP (``inputSchema``). Importing this module
imports neither torch nor the model.

Flow for an agent: find a concept (``list_concepts`` / ``resolve_prompt``) -> inspect it ->
``segment`` with concept ids, so it never has to invent a name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

Format = Literal["openai", "anthropic", "mcp", "json"]
FORMATS = ("openai", "anthropic", "mcp", "json")

DEFAULT_MAX_PROMPTS = 32
MAX_PROMPT_CHARS = 200
OUTPUT_TYPES = ("nifti", "nifti-multilabel", "dicom-seg")


@dataclass(frozen=True)
class ToolSpec:
    """One tool: its name, what it is for, and the JSON Schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]


SEGMENT = ToolSpec(
    name="segment",
    description=(
        "Segment anatomical structures or lesions in a 3D CT or MR scan and measure them. "
        "Give the scan's path (relative to the data folder this tool may read) and one prompt per "
        "structure, preferably concept ids found with list_concepts or resolve_prompt "
        "(e.g. 'liver', 'kidney_left', 'liver_tumor'). Returns, per prompt: the concept it was "
        "read as, whether it was found, volume (mL), centroid and bounding box (RAS mm), mean "
        "model confidence, the mask file, and warnings. Masks are written to files, never returned "
        "inline. A random or untrained model gives meaningless masks: check describe_model first."
    ),
    parameters={
        "type": "object",
        "properties": {
            "scan": {
                "type": "string",
                "description": (
                    "Path of the scan relative to the allowed data folder: a .nii or .nii.gz "
                    "file, a DICOM series folder, or a .zip of one DICOM series."
                ),
                "minLength": 1,
                "maxLength": 1024,
            },
            "prompts": {
                "type": "array",
                "description": (
                    "Structures to segment, one mask each: concept ids (preferred) or "
                    "anatomical terms ('left kidney'). Unknown terms are refused with suggestions. "
                    f"At most {DEFAULT_MAX_PROMPTS} unless the server allows more."
                ),
                "items": {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS},
                "minItems": 1,
            },
            "modality": {
                "type": "string",
                "enum": ["CT", "MR"],
                "description": "Imaging modality; by default read from DICOM or guessed from the intensities.",
            },
            "output_type": {
                "type": "string",
                "enum": list(OUTPUT_TYPES),
                "description": (
                    "nifti: one .nii.gz mask per prompt (default); nifti-multilabel: one label map "
                    "+ labels.json; dicom-seg: one DICOM SEG file (DICOM input only)."
                ),
            },
            "threshold": {
                "type": "number",
                "minimum": 0.0,
                "maximum": 1.0,
                "description": "Probability above which a voxel is in the mask (default: the model's, usually 0.5).",
            },
            "open_vocabulary": {
                "type": "boolean",
                "description": (
                    "Run prompts that match no known concept on their raw text (an unreliable "
                    "guess, flagged in warnings). Default false: unknown prompts are refused."
                ),
            },
            "preview": {
                "type": "boolean",
                "description": "Also write preview.png with axial, coronal and sagittal overlays.",
            },
        },
        "required": ["scan", "prompts"],
        "additionalProperties": False,
    },
)

RESOLVE_PROMPT = ToolSpec(
    name="resolve_prompt",
    description=(
        "Check what a free-text anatomical term means before segmenting: returns the concept it "
        "resolves to (id, name, definition, laterality, parts), how it matched (exact, synonym, "
        "normalised, fuzzy), the confidence, whether segment would accept it with this model (and "
        "as the union of which parts), and close alternatives."
    ),
    parameters={
        "type": "object",
        "properties": {
            "text": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_PROMPT_CHARS,
                "description": "The term, e.g. 'rt kidney', 'hepatic segment VII', 'LAD'.",
            },
            "k": {
                "type": "integer",
                "minimum": 1,
                "maximum": 20,
                "description": "How many alternative candidates to list (default 5).",
            },
        },
        "required": ["text"],
        "additionalProperties": False,
    },
)

LIST_CONCEPTS = ToolSpec(
    name="list_concepts",
    description=(
        "Find concept ids to use as segment prompts. With a query, returns the best matching "
        "concepts; without one, the concepts this model can segment (optionally of one body "
        "system). Each item says whether the model can segment it."
    ),
    parameters={
        "type": "object",
        "properties": {
            "query": {
                "type": "string",
                "maxLength": MAX_PROMPT_CHARS,
                "description": "Words to search for, e.g. 'kidney', 'vertebra', 'tumor'.",
            },
            "system": {
                "type": "string",
                "maxLength": 40,
                "description": (
                    "Restrict to one body system: abdomen, body, brain, endocrine, head_neck, "
                    "heart, lesions, lymphatic, muscles, nerves, skeleton, skeleton_limbs, "
                    "skeleton_ribs, skeleton_spine, thorax, urogenital, vessels."
                ),
            },
            "limit": {
                "type": "integer",
                "minimum": 1,
                "maximum": 200,
                "description": "Maximum number of concepts returned (default 25).",
            },
        },
        "required": [],
        "additionalProperties": False,
    },
)

DESCRIBE_MODEL = ToolSpec(
    name="describe_model",
    description=(
        "Describe the segmentation model behind the segment tool: its name and weights hash, "
        "the structures it was trained on, its working resolution, and this server's limits "
        "(prompts per call, file size, timeout)."
    ),
    parameters={"type": "object", "properties": {}, "required": [], "additionalProperties": False},
)

TOOLS: dict[str, ToolSpec] = {spec.name: spec for spec in (SEGMENT, RESOLVE_PROMPT, LIST_CONCEPTS, DESCRIBE_MODEL)}


def schema(format: Format = "openai", tool: str | None = None) -> list[dict[str, Any]] | dict[str, Any]:
    """Tool descriptions in a provider's format.

    Args:
        format: "openai" (Chat Completions function tools), "anthropic" (Messages API tools),
            "mcp" (MCP ``Tool`` fields) or "json" (name, description, parameters).
        tool: one tool's name; by default all tools, as a list.

    Returns:
        A list of tool dicts, or one dict when `tool` is given. Each call returns fresh
        copies, so callers may edit them.

    Raises:
        ValueError: unknown format or tool name.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown schema format {format!r}; use one of {FORMATS}")
    if tool is not None and tool not in TOOLS:
        raise ValueError(f"unknown tool {tool!r}; the tools are {sorted(TOOLS)}")
    specs = [TOOLS[tool]] if tool is not None else list(TOOLS.values())
    views = [_view(spec, format) for spec in specs]
    return views[0] if tool is not None else views


def _view(spec: ToolSpec, format: str) -> dict[str, Any]:
    parameters = copy.deepcopy(spec.parameters)
    if format == "openai":
        return {"type": "function", "function": {"name": spec.name, "description": spec.description,
                                                 "parameters": parameters}}
    if format == "anthropic":
        return {"name": spec.name, "description": spec.description, "input_schema": parameters}
    if format == "mcp":
        return {"name": spec.name, "description": spec.description, "inputSchema": parameters}
    return {"name": spec.name, "description": spec.description, "parameters": parameters}


def validate_arguments(tool: str, arguments: dict[str, Any]) -> list[str]:
    """Check `arguments` against the tool's schema; return the problems (empty when valid).

    Covers the subset of JSON Schema the tool schemas use: types, required, unknown keys,
    enum, minimum/maximum, minLength/maxLength, minItems/maxItems and array items.
    """
    spec = TOOLS[tool]
    return _check(arguments, spec.parameters, "arguments")


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def _check(value: Any, rule: dict[str, Any], where: str) -> list[str]:
    kind = rule.get("type")
    if kind and not _TYPES[kind](value):
        return [f"{where} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {type(value).__name__}"]
    problems: list[str] = []
    if "enum" in rule and value not in rule["enum"]:
        problems.append(f"{where} must be one of {rule['enum']}, got {value!r}")
    if kind in ("integer", "number"):
        if "minimum" in rule and value < rule["minimum"]:
            problems.append(f"{where} must be >= {rule['minimum']}, got {value}")
        if "maximum" in rule and value > rule["maximum"]:
            problems.append(f"{where} must be <= {rule['maximum']}, got {value}")
    if kind == "string":
        if rule.get("minLength", 0) > 0 and not value.strip():
            problems.append(f"{where} must not be empty")
        if "maxLength" in rule and len(value) > rule["maxLength"]:
            problems.append(f"{where} is longer than {rule['maxLength']} characters")
    if kind == "array":
        if len(value) < rule.get("minItems", 0):
            problems.append(f"{where} needs at least {rule['minItems']} item(s)")
        if "maxItems" in rule and len(value) > rule["maxItems"]:
            problems.append(f"{where} has more than {rule['maxItems']} items")
        for n, item in enumerate(value):
            problems += _check(item, rule.get("items", {}), f"{where}[{n}]")
    if kind == "object":
        properties = rule.get("properties", {})
        for key in rule.get("required", []):
            if key not in value:
                problems.append(f"{where} is missing the required field {key!r}")
        if rule.get("additionalProperties") is False:
            extra = sorted(set(value) - set(properties))
            if extra:
                problems.append(f"{where} has unknown field(s) {extra}; allowed: {sorted(properties)}")
        for key, item in value.items():
            if key in properties:
                problems += _check(item, properties[key], f"{key}" if where == "arguments" else f"{where}.{key}")
    return problems
