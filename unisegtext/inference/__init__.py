"""Inference pipeline: preprocessing, sliding window, results."""

from unisegtext.inference.preprocessing import PreparedVolume, preprocess, restore
from unisegtext.inference.prompts import check_prompts, resolve_prompts
from unisegtext.inference.result import PromptResolution, SegmentationResult
from unisegtext.inference.segment import load_model, predict_probabilities, segment, segment_many

__all__ = [
    "PreparedVolume",
    "PromptResolution",
    "SegmentationResult",
    "check_prompts",
    "load_model",
    "predict_probabilities",
    "preprocess",
    "resolve_prompts",
    "restore",
    "segment",
    "segment_many",
]
