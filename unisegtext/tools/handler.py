"""The tool dispatcher: validated tool calls in, compact JSON out.

:class:`ToolHandler` answers the tools described in :mod:`unisegtext.tools.schema` for any
caller (an OpenAI or Anthropic tool-use loop, the MCP server). It returns JSON-able dicts
only: file paths instead of arrays, and errors as ``{"error", "error_type", "suggestions"}``,
never a traceback.

Safety: the scan path must resolve (symlinks followed) inside ``allowed_root``; outputs go to
a fresh folder under ``output_root``; file size, voxel count, prompt count and run time are
bounded by :class:`ToolLimits`.
"""

from __future__ import annotations

import concurrent.futures
import datetime as _dt
import json
import logging
import os
import threading
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from unisegtext.errors import UniSegError, UnknownConceptError
from unisegtext.tools.paths import ToolInputError, check_file, check_tree, confine
from unisegtext.tools.schema import DEFAULT_MAX_PROMPTS, TOOLS, validate_arguments

logger = logging.getLogger(__name__)


@dataclass
class ToolLimits:
    """Bounds on one tool call.

    Attributes:
        max_prompts: prompts per segment call.
        max_file_mb: size of a scan file, a zip's unpacked content, or a DICOM folder (MB).
        max_files: files in a DICOM folder.
        max_voxels: voxels of a NIfTI scan as stored AND on the model's grid (both read from
            its header: a small file with huge voxel sizes, or a model with a fine spacing,
            must not pass because the stored grid is small).
        max_memory_gb: estimated peak memory of one segment call
            (:func:`unisegtext.resources.estimate_run_memory`; None = the default limit).
        timeout_s: wall-clock seconds for one segment call, input checks included; a call
            that runs longer is answered with an error (its computation finishes in the
            background and is discarded; further segment calls are refused as busy until it
            has).
    """

    max_prompts: int = DEFAULT_MAX_PROMPTS
    max_file_mb: float = 2048.0
    max_files: int = 5000
    max_voxels: int = 512 * 512 * 2000
    max_memory_gb: float | None = None
    timeout_s: float = 600.0


class ToolHandler:
    """Answers tool calls: ``segment``, ``resolve_prompt``, ``list_concepts``, ``describe_model``.

    Args:
        allowed_root: the only folder scans may be read from.
        output_root: where each segment call writes its own output folder.
        limits: bounds on each call (default :class:`ToolLimits`).
        model: a :class:`~unisegtext.models.UniSegText`, a checkpoint folder or Hub id, or
            None for ``$UNISEGTEXT_MODEL`` or else the built-in default model.
        device: "cpu", "cuda" or None (CUDA when available).

    Example:
        >>> handler = ToolHandler(allowed_root="scans", output_root="out")
        >>> handler.handle("segment", {"scan": "ct.nii.gz", "prompts": ["liver"]})
    """

    def __init__(
        self,
        allowed_root: str | os.PathLike,
        output_root: str | os.PathLike,
        *,
        limits: ToolLimits | None = None,
        model: Any = None,
        device: str | None = None,
    ):
        root = Path(allowed_root).expanduser()
        if not root.is_dir():
            raise ToolInputError(f"allowed_root {root} is not a folder")
        self.allowed_root = root.resolve()
        self.output_root = Path(output_root).expanduser().resolve()
        self.limits = limits or ToolLimits()
        self.model = model if model is not None else (os.environ.get("UNISEGTEXT_MODEL") or None)
        self.device = device
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="unisegtext-tool")
        self._running: concurrent.futures.Future | None = None
        self._lock = threading.Lock()
        self._timed_out = False
        self._net: Any = None

    # ------------------------------------------------------------------ dispatch
    def handle(self, name: str, arguments: dict[str, Any] | str | None = None) -> dict[str, Any]:
        """Run tool `name` with `arguments` (a dict or the JSON string a model produced).

        Returns:
            The tool's JSON-able answer, or ``{"error", "error_type", "suggestions"}``.
        """
        answer = self._answer(name, arguments)
        if "error" in answer:  # readers name files by absolute path; the caller knows them relative to the roots
            answer["error"] = self._hide_roots(str(answer["error"]))
        return answer

    def _hide_roots(self, text: str) -> str:
        for root, shown in ((self.allowed_root, "the data folder"), (self.output_root, "the output folder")):
            if root.parent != root:  # not "/"
                text = text.replace(f"{root}{os.sep}", "").replace(str(root), shown)
        return text

    def _answer(self, name: str, arguments: dict[str, Any] | str | None) -> dict[str, Any]:
        try:
            if name not in TOOLS:
                raise ToolRefusal(f"unknown tool {name!r}", suggestions=sorted(TOOLS))
            args = _parse_arguments(arguments)
            problems = validate_arguments(name, args)
            if problems:
                raise ToolInputError(f"invalid arguments for {name}: " + "; ".join(problems))
            return getattr(self, f"_{name}")(args)
        except UnknownConceptError as exc:
            return _error(exc, suggestions=exc.suggestions)
        except ToolRefusal as exc:
            return _error(exc, suggestions=exc.suggestions)
        except UniSegError as exc:
            return _error(exc)
        except Exception as exc:  # never hand a traceback to the caller
            logger.exception("tool %s failed", name)
            return _error(exc, message=f"internal error while running {name}: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        """Stop accepting work (a running segmentation is left to finish)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ tools
    def _segment(self, args: dict[str, Any]) -> dict[str, Any]:
        from unisegtext.inference.prompts import check_prompts

        prompts = check_prompts(list(args["prompts"]))
        if len(prompts) > self.limits.max_prompts:
            raise ToolInputError(
                f"{len(prompts)} prompts is more than this tool's limit of {self.limits.max_prompts}; "
                "split the request into several calls"
            )
        with self._lock:
            if self._running is not None and not self._running.done():
                why = " (it ran past the time limit)" if self._timed_out else ""
                raise ToolRefusal(f"a previous segmentation is still running{why}; try again later")
            self._timed_out = False
            # input checks run in the worker too, so the time limit bounds them as well
            future = self._executor.submit(self._checked_segment, args["scan"], prompts, args)
            self._running = future
        try:
            return future.result(timeout=self.limits.timeout_s)
        except concurrent.futures.TimeoutError:
            self._timed_out = True
            raise ToolRefusal(
                f"segmentation did not finish within {self.limits.timeout_s:g} s; use fewer prompts "
                "or a smaller scan"
            ) from None

    def _checked_segment(self, given: str, prompts: list[str], args: dict[str, Any]) -> dict[str, Any]:
        scan = confine(self.allowed_root, given)
        max_bytes = int(self.limits.max_file_mb * 2**20)
        if scan.is_dir():
            check_tree(self.allowed_root, scan, max_files=self.limits.max_files, max_bytes=max_bytes)
        elif not scan.is_file():
            raise ToolInputError(f"{given!r} is not a regular file or folder (a pipe, device or socket)")
        else:
            spacing = self._spacing()
            check_file(scan, max_bytes=max_bytes, max_voxels=self.limits.max_voxels, model_spacing_mm=spacing,
                       max_memory_gb=self.limits.max_memory_gb, n_prompts=len(prompts))
        if args.get("output_type") == "dicom-seg":  # refuse before any computation
            from unisegtext.io.dicom_seg import DicomSegError, check_prompts_codable
            from unisegtext.io.nifti import is_nifti

            if is_nifti(scan):
                raise DicomSegError(
                    "DICOM SEG output needs a DICOM input series (a folder or .zip), but the scan is "
                    "a NIfTI file: a SEG must reference the images it segments. Use output_type 'nifti'"
                )
            check_prompts_codable(prompts)
        return self._run_segment(scan, prompts, args)

    def _run_segment(self, scan: Path, prompts: list[str], args: dict[str, Any]) -> dict[str, Any]:
        from unisegtext.inference import segment

        output_type = args.get("output_type", "nifti")
        result = segment(
            scan,
            prompts,
            model=self.model if self._routed() else self._model(),
            modality=args.get("modality"),
            threshold=args.get("threshold"),
            open_vocabulary=bool(args.get("open_vocabulary", False)),
            device=self.device,
            progress=False,
            max_memory_gb=self.limits.max_memory_gb,
        )
        out_dir = self._output_dir(scan)
        files = result.save(
            out_dir,
            multilabel=output_type == "nifti-multilabel",
            output_type="dicom-seg" if output_type == "dicom-seg" else "nifti",
            statistics=True,
            preview=bool(args.get("preview")),
        )
        statistics_file = out_dir / "statistics.json"
        preview_file = out_dir / "preview.png" if args.get("preview") else None
        statistics = result.statistics()
        mask_files = _mask_files(result.prompts, [f.relative_to(self.output_root) for f in files], output_type)
        answers = []
        for prompt in result.prompts:
            r = result.resolutions[prompt]
            s = statistics[prompt]
            answers.append({
                "prompt": prompt,
                "concept_id": r.concept_id,
                "concept_name": r.concept_name,
                "how": r.how,
                **({"union_of": r.union_of} if r.union_of else {}),
                "found": bool(s["present"]),
                "present": bool(result.present.get(prompt, s["present"])),
                "presence_probability": round(float(result.presence.get(prompt, 0.0)), 3),
                "volume_ml": round(s["volume_ml"], 2),
                "centroid_mm": _round(s["centroid_mm"]),
                "bbox_mm": {k: _round(v) for k, v in s["bbox_mm"].items()} if s["bbox_mm"] else None,
                "components": s["components"],
                "mean_confidence": round(float(result.scores.get(prompt, 0.0)), 3) if s["present"] else None,
                "file": mask_files.get(prompt),
                "warnings": list(r.warnings),
            })
        volume = result.volume

        def shown(path: Path) -> str:  # never an absolute server path: relative to the output root
            return str(path.relative_to(self.output_root))

        skip = {"prompts.json", "statistics.json", "preview.png", "manifest.json"}
        return {
            "scan": str(scan.relative_to(self.allowed_root)),
            "modality": result.modality,
            "modality_decided_by": result.modality_source,
            "shape": list(volume.shape),
            "spacing_mm": _round(list(volume.spacing)),
            "coordinates": "RAS+ mm (+x right, +y anterior, +z superior)",
            "results": answers,
            "paths_relative_to": "the server's output folder",
            "output_dir": shown(out_dir),
            "files": {
                "outputs": sorted({shown(f) for f in files if f.name not in skip}),
                "statistics": shown(statistics_file),
                "manifest": shown(out_dir / "manifest.json"),
                **({"preview": shown(preview_file)} if preview_file else {}),
            },
            "model": {"name": _model_name(result.model.get("name")), "weights_sha256": result.model.get("weights_sha256")},
            "seconds": round(float(result.timings.get("total", 0.0)), 2),
        }

    def _resolve_prompt(self, args: dict[str, Any]) -> dict[str, Any]:
        from unisegtext.inference.prompts import MIN_CONFIDENCE, resolve_prompts

        tree = _tree()
        text = args["text"].strip()
        k = int(args.get("k", 5))
        resolution = tree.resolve(text)
        candidates = [{"id": cid, "name": tree.get(cid).name, "score": round(float(score), 3)}
                      for cid, score in resolution.candidates[:k]]
        answer: dict[str, Any] = {
            "query": text,
            "concept": _concept_card(resolution.concept, tree) if resolution.concept is not None else None,
            "how": resolution.how,
            "confidence": round(float(resolution.confidence), 3),
            "candidates": candidates,
        }
        try:
            model_view = resolve_prompts([text], self._concepts(), tree=tree)[0]
        except UnknownConceptError as exc:
            answer["segmentable"] = False
            answer["reason"] = str(exc)
            answer["suggestions"] = [{"id": s, "name": tree.get(s).name} for s in exc.suggestions if s in tree]
        else:
            answer["segmentable"] = True
            answer["segment_as"] = {"concept_id": model_view.concept_id, "union_of": model_view.union_of,
                                    "warnings": model_view.warnings}
        answer["min_confidence"] = MIN_CONFIDENCE
        return answer

    def _list_concepts(self, args: dict[str, Any]) -> dict[str, Any]:
        tree = _tree()
        limit = int(args.get("limit", 25))
        system = args.get("system")
        query = (args.get("query") or "").strip()
        systems = sorted({c.system for c in tree})
        if system is not None and system not in systems:
            raise ToolRefusal(f"unknown body system {system!r}", suggestions=systems)
        trained = set(self._concepts())
        if query:
            hits = [(c, s) for c, s in tree.search(query, k=max(limit * 4, 40)) if system is None or c.system == system]
            items = [dict(_concept_item(c, tree, trained), score=round(float(s), 3)) for c, s in hits[:limit]]
            total = len(hits)
        else:
            pool = [c for c in tree if (system is None or c.system == system)]
            if trained:  # what the model can answer: trained concepts and unions of them
                from unisegtext.inference.prompts import union_cover

                pool = [c for c in pool if c.id in trained or union_cover(tree, c.id, trained)]
            items = [_concept_item(c, tree, trained) for c in sorted(pool, key=lambda c: c.id)[:limit]]
            total = len(pool)
        return {"concepts": items, "total": total, "truncated": total > len(items),
                "note": "pass concept ids as segment prompts" + ("" if trained else
                        "; this model lists no trained concepts (an untrained or random model)")}

    def _describe_model(self, args: dict[str, Any]) -> dict[str, Any]:
        from unisegtext.models import describe

        if self._routed():
            from unisegtext.cli.info import describe_backends

            info = describe_backends(self.model)
            info["trained_concepts"] = self._concepts()
        else:
            info = describe(self._model())
        trained = info.pop("trained_concepts")
        info.pop("parameters", None)
        info["trained_concepts_count"] = len(trained)
        info["trained_concepts"] = trained[:200]
        if not trained:
            info["warning"] = ("this model lists no trained concepts: it is untrained or random, and its "
                               "masks carry no anatomical meaning")
        info["name"] = _model_name(info.get("name"))
        info.pop("text_base", None) if str(info.get("text_base", "")).startswith("/") else None
        info["limits"] = asdict(self.limits)
        info["output_types"] = list(TOOLS["segment"].parameters["properties"]["output_type"]["enum"])
        return info

    # ------------------------------------------------------------------ helpers
    def _routed(self) -> bool:
        from unisegtext.inference.routing import is_routed

        return is_routed(self.model)

    def _concepts(self) -> list[str]:
        """What the configured model(s) can answer (for a routed configuration: the union)."""
        if not self._routed():
            return list(self._model().config.concepts)
        from unisegtext.backends import get_backend
        from unisegtext.inference.routing import NATIVE, _backend_name, _candidates

        names = []
        for modality in ("CT", "MR"):
            names += [n for n in _candidates(self.model, modality) if n not in names]
        out: list[str] = []
        for spec in names:
            known = (self._model().config.concepts if _backend_name(spec) == NATIVE and spec == NATIVE
                     else get_backend(spec).concepts() if _backend_name(spec) != NATIVE else [])
            out += [c for c in known if c not in out]
        return out

    def _spacing(self) -> tuple[float, ...]:
        """The finest grid any configured model resamples to (for the voxel-count check)."""
        if not self._routed():
            return tuple(self._model().config.preprocessing.spacing_mm)
        return (1.5, 1.5, 1.5)

    def _model(self) -> Any:
        if self._net is None:
            from unisegtext.inference.segment import load_model, pick_device

            self._net = load_model(self.model, pick_device(self.device))
        return self._net

    def _output_dir(self, scan: Path) -> Path:
        stem = scan.name
        for suffix in (".nii.gz", ".nii", ".zip"):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = self.output_root / f"{stem or 'scan'}-{stamp}-{uuid.uuid4().hex[:6]}"
        folder.mkdir(parents=True, exist_ok=False)
        return folder


def handle(
    arguments: dict[str, Any] | str,
    *,
    allowed_root: str | os.PathLike,
    output_root: str | os.PathLike,
    limits: ToolLimits | None = None,
    tool: str = "segment",
    model: Any = None,
    device: str | None = None,
) -> dict[str, Any]:
    """One-shot :meth:`ToolHandler.handle` (default tool: ``segment``).

    Errors are returned as ``{"error", "error_type", "suggestions"}``, including a bad root.
    """
    try:
        handler = ToolHandler(allowed_root, output_root, limits=limits, model=model, device=device)
    except UniSegError as exc:
        return _error(exc)
    try:
        return handler.handle(tool, arguments)
    finally:
        handler.close()


# --------------------------------------------------------------------------- internals
class ToolRefusal(UniSegError):
    """A refusal with suggestions (unknown tool, busy, timeout)."""

    def __init__(self, message: str, *, suggestions: list[str] | None = None):
        super().__init__(message)
        self.suggestions = list(suggestions or [])


def _parse_arguments(arguments: dict[str, Any] | str | None) -> dict[str, Any]:
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise ToolInputError(f"the arguments are not valid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(arguments, dict):
        raise ToolInputError(f"the arguments must be a JSON object, got {type(arguments).__name__}")
    return arguments


def _error(exc: BaseException, *, suggestions: list[str] | None = None, message: str | None = None) -> dict[str, Any]:
    return {"error": message or str(exc), "error_type": type(exc).__name__,
            "suggestions": list(suggestions or [])}


def _tree():
    from unisegtext.knowledge import load_tree

    return load_tree()


def _round(values: Any, digits: int = 1) -> Any:
    if values is None:
        return None
    return [round(float(v), digits) for v in values]


def _concept_item(concept: Any, tree: Any, trained: set[str]) -> dict[str, Any]:
    from unisegtext.inference.prompts import union_cover

    segmentable = not trained or concept.id in trained or bool(union_cover(tree, concept.id, set(trained)))
    return {"id": concept.id, "name": concept.name, "system": concept.system, "segmentable": segmentable}


def _concept_card(concept: Any, tree: Any) -> dict[str, Any]:
    return {
        "id": concept.id,
        "name": concept.name,
        "synonyms": list(concept.synonyms[:8]),
        "definition": concept.definition,
        "laterality": concept.laterality,
        "system": concept.system,
        "is_a": list(concept.is_a),
        "part_of": list(concept.part_of),
        "located_in": list(concept.located_in),
        "union_of": list(concept.union_of),
        "children": tree.children(concept.id)[:20],
        "has_dicom_code": bool(concept.dicom),
    }


def _model_name(name: Any) -> Any:
    """A model named by a server folder is answered by the folder's name, never its absolute path."""
    if isinstance(name, str) and os.path.isabs(name):
        return Path(name).name
    return name


def _mask_files(prompts: list[str], files: list[Path], output_type: str) -> dict[str, str]:
    if output_type != "nifti":
        shared = next((f for f in files if f.name.startswith("segmentation")), None)
        return {p: str(shared) for p in prompts} if shared else {}
    from unisegtext.inference.result import file_names

    names = file_names(prompts)
    by_name = {f.name: f for f in files}
    return {p: str(by_name[f"{names[p]}.nii.gz"]) for p in prompts if f"{names[p]}.nii.gz" in by_name}
