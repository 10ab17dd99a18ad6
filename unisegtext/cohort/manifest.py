"""The cohort manifest: one CSV row per scan, validated as a whole before anything runs.

Columns: ``case_id``, ``input`` (a NIfTI file, DICOM folder or .zip; relative paths are read
from the manifest's folder), ``prompts`` (separated by ``;``) and optionally ``modality``
(``CT`` or ``MR``). Other columns are ignored. Line numbers in messages are those of the file
(the header is line 1).
"""

from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from unisegtext.errors import ManifestError, PromptError, UnknownConceptError

REQUIRED_COLUMNS = ("case_id", "input", "prompts")
OPTIONAL_COLUMNS = ("modality",)
MODALITIES = ("CT", "MR")
PROMPT_SEPARATOR = ";"
# a case id names its output folder: no separators, no hidden names, nothing the table uses
CASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")
RESERVED_NAMES = {"results.csv", "results.parquet"}
MAX_PROBLEMS_SHOWN = 50


@dataclass(frozen=True)
class Case:
    """One scan of a cohort.

    Attributes:
        case_id: the name of its output folder, ``out/<case_id>/``.
        input: the input as written in the manifest.
        path: the input resolved against the manifest's folder (absolute).
        prompts: the structures to segment, in manifest order.
        modality: "CT", "MR" or None (then read from DICOM or guessed).
        line: its line in the manifest (header = line 1).
    """

    case_id: str
    input: str
    path: Path
    prompts: tuple[str, ...]
    modality: str | None = None
    line: int = 0


@dataclass
class Manifest:
    """A validated manifest: its cases and what each distinct prompt resolved to."""

    path: Path
    cases: list[Case]
    concepts: dict[str, str | None] = field(default_factory=dict)  # prompt -> concept id


def read_manifest(
    path: str | os.PathLike,
    *,
    trained_concepts: Sequence[str] = (),
    template: str = "{name}",
    open_vocabulary: bool = False,
    check_inputs: bool = True,
) -> Manifest:
    """Read and validate a cohort manifest.

    Every problem is collected first (duplicate or unusable case ids, missing inputs, empty or
    duplicate prompts, prompts the model cannot answer, unknown modalities) and reported in one
    :class:`~unisegtext.errors.ManifestError` naming the lines, so a cohort is fixed in one go.

    Args:
        path: the CSV file.
        trained_concepts: concept ids the model was trained on (its config's ``concepts``); a
            prompt is checked exactly as :func:`unisegtext.segment` would check it.
        template: the model's text template.
        open_vocabulary: accept prompts that match no concept (they run on their raw text).
        check_inputs: check that every input exists.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist; pass a CSV file with the columns "
                            f"{', '.join(REQUIRED_COLUMNS)} (and optionally modality)")
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate the BOM that spreadsheets write
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest {path} cannot be read as UTF-8 text ({exc})") from exc
    reader = csv.DictReader(text.splitlines(keepends=True))
    columns = [c.strip().lower() for c in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(
            f"manifest {path} lacks the column(s) {', '.join(missing)}; its header is "
            f"{', '.join(repr(c) for c in columns) or '(empty)'}; expected "
            f"{','.join(REQUIRED_COLUMNS)}[,modality] with prompts separated by '{PROMPT_SEPARATOR}'"
        )
    reader.fieldnames = columns
    base = path.parent
    problems: list[tuple[int, str]] = []  # (first line concerned, text)
    cases: list[Case] = []
    lines_by_id: dict[str, list[tuple[int, str]]] = defaultdict(list)
    lines_by_prompt: dict[str, list[int]] = defaultdict(list)
    for row in reader:
        line = reader.line_num
        values = {k: (v or "").strip() for k, v in row.items() if k is not None}
        case_id, source = values.get("case_id", ""), values.get("input", "")
        where = f"line {line}" + (f" (case {case_id!r})" if case_id else "")
        if not case_id:
            problems.append((line, f"line {line}: case_id is empty"))
        elif not CASE_ID_PATTERN.match(case_id) or case_id.lower() in RESERVED_NAMES:
            problems.append((line, f"{where}: case_id must be a folder name of letters, digits, '.', "
                                   "'_' and '-' that does not start with '.' (and is not results.csv/.parquet)"))
        else:
            lines_by_id[case_id.casefold()].append((line, case_id))
        input_path = (base / Path(source).expanduser()).resolve() if source else base
        if not source:
            problems.append((line, f"{where}: input is empty"))
        elif check_inputs and not input_path.exists():
            problems.append((line, f"{where}: input {source!r} does not exist (looked for {input_path})"))
        prompts = [p.strip() for p in values.get("prompts", "").split(PROMPT_SEPARATOR) if p.strip()]
        if not prompts:
            problems.append((line, f"{where}: no prompts; list them separated by '{PROMPT_SEPARATOR}', "
                                   "e.g. liver;spleen"))
        duplicates = sorted({p for p in prompts if prompts.count(p) > 1})
        if duplicates:
            problems.append((line, f"{where}: prompt(s) {', '.join(map(repr, duplicates))} appear twice"))
        for prompt in dict.fromkeys(prompts):
            lines_by_prompt[prompt].append(line)
        modality = values.get("modality", "").upper() or None
        if modality is not None and modality not in MODALITIES:
            problems.append((line, f"{where}: modality {values['modality']!r} is neither CT nor MR "
                                   "(leave it empty to read it from DICOM or guess it)"))
        cases.append(Case(case_id, source, input_path, tuple(dict.fromkeys(prompts)), modality, line))
    if not cases:
        raise ManifestError(f"manifest {path} has a header but no rows; add one row per scan")
    for uses in lines_by_id.values():
        if len(uses) > 1:
            ids = " / ".join(repr(i) for i in dict.fromkeys(i for _, i in uses))
            problems.append((uses[0][0], f"lines {_lines([n for n, _ in uses])}: case id {ids} is used "
                             "more than once (ids name the output folders; ids that differ only in "
                             "case collide on macOS and Windows)"))
    concepts = {}
    for prompt, lines in lines_by_prompt.items():
        concept, problem = _check_prompt(prompt, trained_concepts, template, open_vocabulary)
        if problem:
            problems.append((lines[0], f"line{'s' if len(lines) > 1 else ''} {_lines(lines)}: {problem}"))
        concepts[prompt] = concept
    if problems:
        problems.sort(key=lambda p: p[0])  # stable: a line's own problems keep their order
        texts = [text for _, text in problems]
        shown = texts[:MAX_PROBLEMS_SHOWN]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise ManifestError(
            f"manifest {path} has {len(problems)} problem{'s' if len(problems) > 1 else ''}; "
            "nothing was run:\n  " + ";\n  ".join(shown) + more,
            problems=texts,
        )
    return Manifest(path=path, cases=cases, concepts=concepts)


def _lines(lines: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(n) for n in lines[:limit])
    return shown + (f" and {len(lines) - limit} more" if len(lines) > limit else "")


def _check_prompt(prompt: str, trained: Sequence[str], template: str,
                  open_vocabulary: bool) -> tuple[str | None, str | None]:
    """(concept id, None) when the model can answer `prompt`, else (None, the problem)."""
    from unisegtext.inference.prompts import check_prompts, resolve_prompts

    try:
        check_prompts([prompt])
        (resolution,) = resolve_prompts([prompt], trained, template, open_vocabulary=open_vocabulary)
    except UnknownConceptError as exc:
        # keep what and why; the "how to fix" tail is the same for every prompt
        message = str(exc)
        for tail in (" Use one of the suggestions", " Pass open_vocabulary=True"):
            message = message.split(tail)[0]
        return None, message.rstrip() + " (search with `unisegtext knowledge search TEXT`, or run with --open-vocabulary)"
    except PromptError as exc:
        return None, str(exc)
    return resolution.concept_id, None
