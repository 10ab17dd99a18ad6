"""`unisegtext segment`: segment a scan from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment structures named by text prompts",
        description="Segment a CT or MR scan: one mask per prompt, written on the input grid.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-i", "--input", help="scan: .nii/.nii.gz file, DICOM folder or DICOM .zip")
    src.add_argument("--example", action="store_true", help="use the bundled example CT (abdomen, 3 mm)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("-p", "--prompt", action="append", nargs="+", default=[], metavar="TEXT",
                   help="a structure to segment (repeat: -p liver -p 'kidney tumor')")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--model", default=None,
                   help="checkpoint folder, Hub repo id or built-in name (default: unisegtext-nano); or a backend: "
                        "totalsegmentator:total, totalsegmentator:total_fast, totalsegmentator:total_mr, or auto "
                        "(each prompt to the best installed model that knows it)")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="for a backend model: its weights (a TotalSegmentator release zip, results folder or "
                        "converted folder); default: the cache, see README")
    p.add_argument("--ml", "--multilabel", dest="multilabel", action="store_true",
                   help="write one multilabel NIfTI + labels.json instead of one file per prompt")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "auto"], help="default: cuda if available")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap in [0, 0.9] (default 0.25)")
    p.add_argument("--threshold", type=float, default=None, help="probability threshold (default 0.5)")
    p.add_argument("--modality", choices=["CT", "MR"], default=None, help="default: DICOM tag or guessed")
    p.add_argument("--channel", type=int, default=None, help="for 4D inputs: which volume to use")
    p.add_argument("--series", default=None, metavar="UID",
                   help="for a DICOM folder/zip with several series: the SeriesInstanceUID to read")
    p.add_argument("--max-memory", type=float, default=None, metavar="GB",
                   help="refuse runs estimated to need more memory (default: 80%% of RAM or $UNISEGTEXT_MAX_MEMORY_GB)")
    p.add_argument("--open-vocabulary", action="store_true", help="run unknown prompts on their raw text (with a warning)")
    p.add_argument("--probabilities", action="store_true", help="also write probability maps")
    p.add_argument("--output-type", choices=["nifti", "dicom-seg"], default="nifti",
                   help="nifti (default) or dicom-seg: one DICOM SEG referencing the input series "
                        "(DICOM input only; needs the `dicom` extra)")
    p.add_argument("--dicom-generic-codes", action="store_true",
                   help="for dicom-seg: code concepts without a DICOM code as the generic 'Tissue' "
                        "(or 'Lesion') instead of refusing")
    p.add_argument("--statistics", action="store_true",
                   help="write statistics.json: volume, centroid, bounding box, intensity, components per prompt")
    p.add_argument("--preview", action="store_true",
                   help="write preview.png: axial, coronal and sagittal overlays with a legend")
    p.add_argument("--report", metavar="PATH", default=None,
                   help="write a run report (versions, model and weights hash, prompts, files, timings) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=run)


def collect_prompts(args: argparse.Namespace) -> list[str]:
    prompts = [text for group in args.prompt for text in group]
    if args.prompts_file:
        from unisegtext.errors import PromptError

        path = Path(args.prompts_file)
        if not path.is_file():  # a FIFO would block and /dev/zero never end
            raise PromptError(f"--prompts-file {path} is not a regular file (missing, a folder, pipe or device); "
                              "pass a text file with one prompt per line")
        lines = path.read_text(errors="replace").splitlines()
        prompts += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return prompts


def _backend_options(args: argparse.Namespace) -> dict:
    """``backend_options`` for segment(): --weights goes to the named backend model."""
    if not args.weights:
        return {}
    from unisegtext.errors import UniSegError
    from unisegtext.inference.routing import is_routed

    if not (args.model and is_routed(args.model) and args.model != "auto"):
        raise UniSegError("--weights is for a backend model (e.g. --model totalsegmentator:total); a UniSegText "
                          "checkpoint is named by --model itself")
    return {"backend_options": {args.model: {"weights": args.weights}}}


def run(args: argparse.Namespace) -> int:
    from unisegtext.errors import PromptError
    from unisegtext.inference import segment
    from unisegtext.io.output import OutputError, OutputFolder, check_output_dir

    prompts = collect_prompts(args)
    if not prompts:
        raise PromptError("no prompts given; add at least one with -p, e.g. -p liver")
    if args.example:
        from unisegtext.examples import example_path

        source = str(example_path("ct"))
    else:
        source = args.input
    if args.report:  # every place this run writes is checked before any computation
        report = Path(args.report).expanduser()
        if report.is_dir():
            raise OutputError(f"--report {report} is a folder; pass a file path such as run.json")
        if report.exists() and not report.is_file():  # /dev/stdout, a pipe: the atomic rename would replace it
            raise OutputError(f"--report {report} is not a regular file (a device, pipe or socket); pass a file path "
                              "such as run.json")
        check_output_dir(report.parent if str(report.parent) else Path("."))
    with OutputFolder(args.output):  # writable, and locked against a second writer, for the whole run
        if args.output_type == "dicom-seg":  # refuse before any computation
            from unisegtext.io import read_volume
            from unisegtext.io.dicom_seg import check_prompts_codable, source_datasets

            source = read_volume(source, modality=args.modality, channel=args.channel, series_uid=args.series,
                                 max_memory_gb=args.max_memory)
            source_datasets(source)
            check_prompts_codable(prompts, generic_codes=args.dicom_generic_codes)
        result = segment(
            source,
            prompts,
            model=args.model,
            modality=args.modality,
            device=args.device,
            threshold=args.threshold,
            overlap=args.overlap,
            return_probabilities=args.probabilities,
            progress=not args.quiet,
            open_vocabulary=args.open_vocabulary,
            channel=args.channel,
            series_uid=args.series if not args.output_type == "dicom-seg" else None,
            max_memory_gb=args.max_memory,
            **_backend_options(args),
        )
        files = result.save(args.output, multilabel=args.multilabel, probabilities=args.probabilities,
                            output_type=args.output_type, dicom_generic_codes=args.dicom_generic_codes,
                            statistics=args.statistics, preview=args.preview)
    if args.report:
        from unisegtext.inference.report import write_report

        options = {k: v for k, v in vars(args).items() if k not in ("func", "prompt")}
        options["prompts"] = prompts
        files.append(write_report(result, args.report, files, options=options))
    if not args.quiet:
        summary = {
            prompt: {
                "concept": r.concept_id,
                "how": r.how,
                "volume_ml": round(result.volumes_ml[prompt], 2),
                "present": bool(result.present.get(prompt, True)),
                "presence_probability": round(float(result.presence.get(prompt, 1.0)), 3),
                **({"union_of": r.union_of} if r.union_of else {}),
            }
            for prompt, r in result.resolutions.items()
        }
        print(json.dumps({"output": [str(f) for f in files], "prompts": summary,
                          "modality": {"value": result.modality, "how": result.modality_source},
                          "seconds": round(result.timings["total"], 2)}, indent=2))
        if result.absent:
            print(f"absent: {', '.join(result.absent)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from unisegtext.cli import main

    sys.exit(main(["segment", *sys.argv[1:]]))
