"""DICOM SEG output (and read-back) with highdicom.

A DICOM Segmentation references the images it was computed on, so it can only be written
for a result whose input was a DICOM series (``Volume.meta["datasets"]``, the source headers
sorted by slice position, as :func:`unisegtext.io.dicom.read_dicom_series` keeps them). For a
NIfTI input the writer refuses with a clear message rather than inventing a source series:
a SEG that points at images no archive holds would not load in a PACS.

Every segment is coded from the knowledge tree: SNOMED CT category and type, the laterality
modifier, the anatomic region for lesions (``Concept.codes["dicom"]``, sourced from
TotalSegmentator's mapping and DICOM PS3.16), and the concept's display colour as CIELab.
A concept without a sourced DICOM code is refused unless ``generic_codes=True``, which codes
it with a generic, clearly non-specific pair from DICOM CID 7150/7151 instead (see
:data:`GENERIC_ANATOMY`, :data:`GENERIC_LESION`); its label and description still name the
concept.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from unisegtext.errors import UniSegError
from unisegtext.io.volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    from unisegtext.io.record import ResultRecord as SegmentationResult
    from unisegtext.knowledge import Concept, KnowledgeTree

logger = logging.getLogger(__name__)

Coding = dict[str, str]  # {"scheme", "value", "meaning"}

# Generic codes, used only with generic_codes=True. Each is listed in
# ../shared/data/anatomy/dicom_snomed_anatomy.tsv (pydicom 3.0.2's DICOM PS3.16 tables) and is
# reachable as pydicom.sr.codedict.codes.SCT.<keyword>:
#   85756007 "Tissue" (BodyTissueStructure,Tissue): CID 7150 category and CID 7151/7166 type
#   49755003 "Morphologically Abnormal Structure": CID 7150 category
#   52988006 "Lesion": CID 7151/7159 type
GENERIC_ANATOMY: dict[str, Coding] = {
    "category": {"scheme": "SCT", "value": "85756007", "meaning": "Tissue"},
    "type": {"scheme": "SCT", "value": "85756007", "meaning": "Tissue"},
}
GENERIC_LESION: dict[str, Coding] = {
    "category": {"scheme": "SCT", "value": "49755003", "meaning": "Morphologically Abnormal Structure"},
    "type": {"scheme": "SCT", "value": "52988006", "meaning": "Lesion"},
}
# SNOMED CT laterality qualifiers as DICOM uses them (knowledge-tree README, DICOM CID 244)
LATERALITY: dict[str, Coding] = {
    "left": {"scheme": "SCT", "value": "7771000", "meaning": "Left"},
    "right": {"scheme": "SCT", "value": "24028007", "meaning": "Right"},
}

ALGORITHM_NAME = "UniSegText"


class DicomSegError(UniSegError, ValueError):
    """A DICOM SEG cannot be written (no DICOM source, uncoded concept, missing highdicom)."""


@dataclass
class SegmentCoding:
    """How one prompt is coded in the SEG.

    Attributes:
        prompt: the prompt text.
        label: SegmentLabel (LO, at most 64 characters).
        description: SegmentDescription: the concept name and id.
        category, type: SNOMED CT codes ``{"scheme", "value", "meaning"}``.
        modifier: laterality modifier of the type, or None.
        region: anatomic region (for lesions), or None; region_modifier likewise.
        color: display colour (r, g, b), 0-255.
        generic: True when generic codes replace a missing concept code.
        tracking_id: the concept id (or the prompt when it has none).
    """

    prompt: str
    label: str
    description: str
    category: Coding
    type: Coding
    modifier: Coding | None
    region: Coding | None
    region_modifier: Coding | None
    color: tuple[int, int, int]
    generic: bool
    tracking_id: str


def _highdicom():
    try:
        import highdicom as hd
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DicomSegError("writing DICOM SEG needs highdicom: pip install 'unisegtext[dicom]'") from exc
    return hd


def source_datasets(volume: Volume) -> list[Any]:
    """The source DICOM headers of `volume`, checked against its grid.

    Raises:
        DicomSegError: the volume was not read from a DICOM series, or its headers do not
            match its grid.
    """
    datasets = volume.meta.get("datasets") if volume.meta else None
    if not datasets:
        raise DicomSegError(
            f"DICOM SEG output needs a DICOM input series, but the scan came from "
            f"{volume.source or 'an in-memory array'!r} (not DICOM): a SEG must reference the "
            "images it segments. Write NIfTI instead (output_type='nifti', CLI: --output-type "
            "nifti), or segment the original DICOM folder/.zip"
        )
    x, y, z = volume.shape
    if len(datasets) != z:
        raise DicomSegError(f"the volume has {z} slices but {len(datasets)} source DICOM headers")
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    if (rows, cols) != (y, x):
        raise DicomSegError(
            f"source images are {rows}x{cols} (rows x columns) but the volume grid is {x}x{y}x{z}; "
            "the masks must be on the DICOM grid"
        )
    if not datasets[0].get("FrameOfReferenceUID"):
        raise DicomSegError(
            "the source DICOM series has no FrameOfReferenceUID; DICOM SEG needs one to place "
            "the segments in space"
        )
    return list(datasets)


def segment_codings(result: SegmentationResult, *, generic_codes: bool = False, tree: KnowledgeTree | None = None) -> list[SegmentCoding]:
    """Code every prompt of `result` from the knowledge tree.

    Raises:
        DicomSegError: a prompt's concept has no sourced DICOM code and `generic_codes` is
            False (the message names the prompts and how to proceed).
    """
    if tree is None:
        from unisegtext.knowledge import load_tree

        tree = load_tree()
    colors = result.colors()
    out: list[SegmentCoding] = []
    missing: list[str] = []
    for prompt in result.prompts:
        resolution = result.resolutions.get(prompt)
        concept_id = resolution.concept_id if resolution else None
        concept = tree.get(concept_id) if concept_id is not None and concept_id in tree else None
        dicom = concept.dicom if concept is not None else None
        if dicom and dicom.get("category") and dicom.get("type"):
            coding = _from_concept(prompt, concept, dicom, colors[prompt])
        elif generic_codes:
            coding = _generic(prompt, concept, tree, colors[prompt])
            logger.warning("%r has no DICOM code in the knowledge tree; coded generically as %s / %s",
                           prompt, coding.category["meaning"], coding.type["meaning"])
        else:
            missing.append(f"{prompt!r} ({concept_id or 'no concept'})")
            continue
        out.append(coding)
    if missing:
        raise _uncoded(missing)
    return out


def check_prompts_codable(prompts: list[str], *, generic_codes: bool = False, tree: KnowledgeTree | None = None) -> None:
    """Refuse early (before any computation) prompts that :func:`segment_codings` would refuse.

    Raises:
        DicomSegError: a prompt resolves to no concept, or to one without a DICOM code, and
            `generic_codes` is False.
    """
    if generic_codes:
        return
    if tree is None:
        from unisegtext.knowledge import load_tree

        tree = load_tree()
    missing = []
    for prompt in prompts:
        concept = tree.resolve(prompt).concept
        dicom = concept.dicom if concept is not None else None
        if not (dicom and dicom.get("category") and dicom.get("type")):
            missing.append(f"{prompt!r} ({concept.id if concept is not None else 'no concept'})")
    if missing:
        raise _uncoded(missing)


def _uncoded(missing: list[str]) -> DicomSegError:
    return DicomSegError(
        f"no DICOM (SNOMED CT) code is known for {', '.join(missing)}; UniSegText does not "
        "invent codes. Write NIfTI for these prompts, or pass generic_codes=True "
        "(CLI: --dicom-generic-codes) to code them as the generic 'Tissue' (or 'Lesion') "
        "with their name in the segment label"
    )


def build_dicom_seg(result: SegmentationResult, *, generic_codes: bool = False, series_number: int = 900,
                    series_description: str = "UniSegText segmentation") -> Any:
    """Build a binary ``highdicom.seg.Segmentation`` with one segment per prompt.

    Args:
        result: a result whose input was a DICOM series.
        generic_codes: see :func:`segment_codings`.
        series_number: SeriesNumber of the new SEG series.
        series_description: SeriesDescription of the new SEG series.

    Returns:
        A ``highdicom.seg.Segmentation`` (a pydicom Dataset).
    """
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    from unisegtext import __version__

    datasets = source_datasets(result.volume)
    codings = segment_codings(result, generic_codes=generic_codes)
    model_name = str(result.model.get("name") or "unknown model")
    weights = str(result.model.get("weights_sha256") or "")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=codes.cid7162.ArtificialIntelligence,
        version=__version__,
        parameters={"model": model_name[:1024], "weights_sha256": weights or "unknown"},
    )
    descriptions = []
    for number, coding in enumerate(codings, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=coding.label,
            segmented_property_category=_code(hd, coding.category),
            segmented_property_type=_code(hd, coding.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id=coding.tracking_id[:64],
            anatomic_regions=[_code(hd, coding.region)] if coding.region else None,
            display_color=hd.color.CIELabColor.from_rgb(*coding.color),
        )
        if coding.modifier:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                _code(hd, coding.modifier)
            ]
        if coding.region and coding.region_modifier:
            description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [
                _code(hd, coding.region_modifier)
            ]
        description.SegmentDescription = coding.description[:64]
        descriptions.append(description)

    # (frames = source slices in position order, rows = j, columns = i, segments)
    pixels = np.stack([result.masks[c.prompt] for c in codings], axis=-1).transpose(2, 1, 0, 3)
    return hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=np.ascontiguousarray(pixels.astype(np.uint8)),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="UniSegText",
        manufacturer_model_name=model_name[-64:],
        software_versions=__version__,
        device_serial_number=(weights[:16] or "unknown"),
        series_description=series_description,
        content_description="Text-prompted segmentation (UniSegText)",
    )


def write_dicom_seg(result: SegmentationResult, path: str | os.PathLike, *, generic_codes: bool = False,
                    **kwargs: Any) -> Path:
    """Write the masks of `result` as one DICOM SEG file and return its path.

    Args:
        result: a result whose input was a DICOM series (folder or zip).
        path: the output file (``segmentation.dcm``).
        generic_codes: code concepts without a DICOM code generically instead of refusing.
        **kwargs: passed to :func:`build_dicom_seg` (series_number, series_description).

    Raises:
        DicomSegError: NIfTI/array input, a concept without a code, or highdicom missing.
    """
    seg = build_dicom_seg(result, generic_codes=generic_codes, **kwargs)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        seg.save_as(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_dicom_seg(path: str | os.PathLike, reference: Volume) -> dict[str, np.ndarray]:
    """Read a DICOM SEG back onto the grid of its source series.

    Args:
        path: the SEG file.
        reference: the source series as read by :func:`unisegtext.io.read_volume`.

    Returns:
        SegmentLabel -> bool mask (X, Y, Z) on the grid of `reference`.
    """
    hd = _highdicom()
    datasets = source_datasets(reference)
    seg = hd.seg.segread(str(path))
    numbers = [int(item.SegmentNumber) for item in seg.SegmentSequence]
    labels = [str(item.SegmentLabel) for item in seg.SegmentSequence]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets],
        segment_numbers=numbers,
        combine_segments=False,
    )  # (frames, rows, columns, segments)
    # frame k, row j, column i -> (i, j, k)
    return {label: np.ascontiguousarray(pixels[..., n].transpose(2, 1, 0)).astype(bool)
            for n, label in enumerate(labels)}


# --------------------------------------------------------------------------- helpers
def _code(hd: Any, coding: Coding) -> Any:
    return hd.sr.CodedConcept(value=str(coding["value"]), scheme_designator=str(coding["scheme"]),
                              meaning=str(coding["meaning"])[:64])


def _lo(text: str) -> str:
    """A valid DICOM LO value: no backslash (the value separator) or control characters, <= 64."""
    cleaned = "".join(" " if ord(ch) < 32 else ch for ch in text.replace("\\", "/"))
    return cleaned.strip()[:64]


def _label(prompt: str, concept: Concept | None) -> str:
    return _lo(prompt) or _lo(concept.name if concept else "") or "segment"


def _description(prompt: str, concept: Concept | None) -> str:
    return _lo(f"{concept.name} ({concept.id})" if concept is not None else f"free text: {prompt}")


def _laterality_modifier(concept: Concept, type_code: Coding) -> Coding | None:
    """The concept's laterality as a modifier, unless the type already names the side."""
    side = concept.laterality
    if side not in LATERALITY or side in str(type_code.get("meaning", "")).lower():
        return None
    return dict(LATERALITY[side])


def _from_concept(prompt: str, concept: Concept, dicom: dict[str, Any], color: tuple[int, int, int]) -> SegmentCoding:
    type_code = dict(dicom["type"])
    modifier = dict(dicom["modifier"]) if dicom.get("modifier") else _laterality_modifier(concept, type_code)
    return SegmentCoding(
        prompt=prompt,
        label=_label(prompt, concept),
        description=_description(prompt, concept),
        category=dict(dicom["category"]),
        type=type_code,
        modifier=modifier,
        region=dict(dicom["region"]) if dicom.get("region") else None,
        region_modifier=dict(dicom["region_modifier"]) if dicom.get("region_modifier") else None,
        color=color,
        generic=False,
        tracking_id=concept.id,
    )


def _generic(prompt: str, concept: Concept | None, tree: KnowledgeTree, color: tuple[int, int, int]) -> SegmentCoding:
    lesion = concept is not None and (concept.system == "lesions" or bool(concept.located_in))
    codes = GENERIC_LESION if lesion else GENERIC_ANATOMY
    region = region_modifier = None
    if lesion and concept is not None:
        for organ_id in concept.located_in:  # the organ's own sourced code is the region
            organ = tree.get(organ_id) if organ_id in tree else None
            if organ is not None and organ.dicom and organ.dicom.get("type"):
                region = dict(organ.dicom["type"])
                region_modifier = dict(organ.dicom["modifier"]) if organ.dicom.get("modifier") else None
                break
    return SegmentCoding(
        prompt=prompt,
        label=_label(prompt, concept),
        description=_description(prompt, concept),
        category=dict(codes["category"]),
        type=dict(codes["type"]),
        modifier=None,
        region=region,
        region_modifier=region_modifier,
        color=color,
        generic=True,
        tracking_id=concept.id if concept is not None else prompt,
    )
