"""TotalSegmentator's published weights behind the backend interface (issue 18).

Everything runs offline on tiny random networks saved exactly as TotalSegmentator releases them
(nnU-Net results folder with an nnU-Net-shaped checkpoint, zipped). Where the peers' own code is
installed (dynamic-network-architectures, nnunetv2, totalsegmentator, all with ``--no-deps``),
it is the reference: DNA's `PlainConvUNet` for logits, nnU-Net's `nnUNetPredictor` plus
TotalSegmentator's resampling and reorientation helpers for masks.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from unisegtext.backends import get_backend
from unisegtext.backends.totalseg import nnunet as nn_ref
from unisegtext.backends.totalseg.backend import PartModel, TotalSegmentatorBackend
from unisegtext.backends.totalseg.convert import convert, load_checkpoint
from unisegtext.backends.totalseg.network import PlainConvUNet, UNetArchitecture
from unisegtext.backends.totalseg.tasks import get_task
from unisegtext.errors import BackendError, ModelLoadError, UnsafeCheckpointError
from unisegtext.io import Volume

try:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet as DNAPlainConvUNet
except ImportError:  # the reference is then our own module with DNA's alias keys added
    DNAPlainConvUNet = None

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalseg_examples"

# a reduced plan: 3 stages, 4/8/8 features, a small non-cubic patch (axis order matters)
SMALL = {"base": 4, "max": 8, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "patch": [24, 16, 32]}
CT_PROPERTIES = {"max": 3000.0, "mean": 80.5, "median": 60.0, "min": -1024.0, "percentile_00_5": -990.0,
                 "percentile_99_5": 1400.0, "std": 250.25}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny networks: one thread is faster, and much faster on a busy machine (no spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- release fixtures

def plans_json(dataset: str, *, spacing, patch=SMALL["patch"], fmt: str = "old", modality: str = "CT",
               transpose=(0, 1, 2), use_mask_for_norm: bool = False) -> dict:
    n = len(SMALL["strides"])
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": list(patch), "median_image_size_in_voxels": [100, 100, 100], "spacing": list(spacing),
        "normalization_schemes": ["CTNormalization" if modality == "CT" else "ZScoreNormalization"],
        "use_mask_for_norm": [use_mask_for_norm],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "batch_dice": True,
    }
    if fmt == "old":
        config.update({
            "UNet_class_name": "PlainConvUNet", "UNet_base_num_features": SMALL["base"],
            "n_conv_per_stage_encoder": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1),
            "num_pool_per_axis": [n - 1] * 3, "pool_op_kernel_sizes": SMALL["strides"],
            "conv_kernel_sizes": [[3, 3, 3]] * n, "unet_max_num_features": SMALL["max"],
        })
    else:
        config["architecture"] = {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n, "features_per_stage": [min(SMALL["base"] * 2**i, SMALL["max"]) for i in range(n)],
                "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * n,
                "strides": SMALL["strides"], "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1),
                "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        }
    transpose = list(transpose)
    backward = [transpose.index(i) for i in range(3)]
    return {
        "dataset_name": dataset, "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": [100, 100, 100], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": transpose, "transpose_backward": backward, "configurations": {"3d_fullres": config},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(CT_PROPERTIES)},
    }


def reference_network(n_classes: int, seed: int) -> torch.nn.Module:
    """DNA's PlainConvUNet (or ours) with seeded random weights, non-trivial norm affines."""
    torch.manual_seed(seed)
    n = len(SMALL["strides"])
    features = [min(SMALL["base"] * 2**i, SMALL["max"]) for i in range(n)]
    if DNAPlainConvUNet is not None:
        net = DNAPlainConvUNet(1, n, features, torch.nn.Conv3d, [[3, 3, 3]] * n, SMALL["strides"], [2] * n,
                               n_classes, [2] * (n - 1), True, torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True},
                               None, None, torch.nn.LeakyReLU, {"inplace": True})
        net.apply(net.initialize)
    else:
        net = PlainConvUNet(UNetArchitecture(1, n_classes, features, [[3, 3, 3]] * n, SMALL["strides"], [2] * n,
                                             [2] * (n - 1)))
    for module in net.modules():
        if isinstance(module, torch.nn.InstanceNorm3d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
        if isinstance(module, torch.nn.Conv3d) and module.out_channels == n_classes:
            module.bias.data.uniform_(-0.5, 0.5)  # varied argmax winners
    return net.eval()


def dna_state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's state dict as nnU-Net saves it (with DNA's alias keys)."""
    state = net.state_dict()
    if DNAPlainConvUNet is None:  # add DNA's aliases so the converter has to drop them
        for key in list(state):
            if key.startswith("encoder."):
                state["decoder." + key] = state[key]
            for kind, index in ((".conv.", 0), (".norm.", 1)):
                if kind in key:
                    state[key.replace(kind, f".all_modules.{index}.")] = state[key]
    return state


def write_release(root: Path, dataset: str, class_names: list[str], *, spacing, seed: int = 0, fmt: str = "old",
                  trainer: str = "nnUNetTrainerNoMirroring", transpose=(0, 1, 2), modality: str = "CT",
                  extra: dict | None = None, as_zip: bool = True, use_mask_for_norm: bool = False,
                  ) -> tuple[Path, torch.nn.Module]:
    """A results folder in TotalSegmentator's release layout (zipped like the release)."""
    net = reference_network(len(class_names) + 1, seed)
    plans = plans_json(dataset, spacing=spacing, fmt=fmt, transpose=transpose, modality=modality,
                       use_mask_for_norm=use_mask_for_norm)
    dataset_json = {"channel_names": {"0": modality}, "labels": {"background": 0, **{n: i + 1 for i, n in enumerate(class_names)}},
                    "numTraining": 1228, "file_ending": ".nii.gz"}
    checkpoint = {
        "network_weights": dna_state_dict(net),
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.99, "params": [0, 1]}]},
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.41), np.float64(0.52)], "ema_fg_dice": [np.float64(0.4)],
                    "dice_per_class_or_region": [[np.float32(0.1), np.float32(0.2)]], "train_losses": [np.float64(-0.3)],
                    "val_losses": [np.float64(-0.2)], "lrs": [0.01, 0.0099], "epoch_start_timestamps": [1.7e9],
                    "epoch_end_timestamps": [1.7e9 + 60]},
        "_best_ema": np.float64(0.52),
        "current_epoch": 4000,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset_json,
                      "device": torch.device("cpu")},
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": (0, 1, 2),
        **(extra or {}),
    }
    folder = root / dataset / f"{trainer}__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    if not as_zip:
        return folder, net
    target = root / f"{dataset}.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted((root / dataset).rglob("*")):
            archive.write(path, path.relative_to(root).as_posix())
    return target, net


def class_map(task: str) -> dict[int, str]:
    """The task's global class map from the shared example data (not from the package)."""
    return {int(k): v for k, v in json.loads((SHARED / "classes.json").read_text())[task].items()}


# `total`'s five parts as global id ranges (issue notes: 291 organs 1-24, 292 vertebrae 25-50,
# 293 cardiac 51-68, 294 muscles 69-91, 295 ribs 92-117)
TOTAL_PARTS = {291: (1, 24), 292: (25, 50), 293: (51, 68), 294: (69, 91), 295: (92, 117)}


# ---------------------------------------------------------------- (a) network and converter

@pytest.mark.parametrize("fmt", ["old", "new"])
def test_converted_weights_give_the_reference_logits(tmp_path, fmt):
    names = [class_map("total")[i] for i in range(1, 6)]
    zipped, reference = write_release(tmp_path, "Dataset297_TotalSegmentator_total_3mm_1559subj", names,
                                      spacing=[3.0, 3.0, 3.0], fmt=fmt, seed=3)
    (part_folder,) = convert(zipped, tmp_path / "converted", provenance={"task": "total_fast"})
    assert sorted(p.name for p in part_folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((part_folder / "config.json").read_text())
    assert config["architecture"]["features_per_stage"] == [4, 8, 8]
    assert config["labels"] == {str(i + 1): n for i, n in enumerate(names)}
    assert config["preprocessing"]["foreground_intensity_properties_per_channel"]["0"] == CT_PROPERTIES
    assert config["source_sha256"] and config["task"] == "total_fast"
    network = PartModel(part_folder).network()
    assert not any("all_modules" in k or k.startswith("decoder.encoder") for k in network.state_dict())
    torch.manual_seed(1)
    x = torch.randn(1, 1, *SMALL["patch"])
    with torch.no_grad():
        diff = (network(x) - reference(x)).abs().max().item()
    assert diff <= 1e-5


def test_old_and_new_plans_describe_the_same_network():
    old = plans_json("D", spacing=[1.5] * 3, fmt="old")["configurations"]["3d_fullres"]
    new = plans_json("D", spacing=[1.5] * 3, fmt="new")["configurations"]["3d_fullres"]
    assert UNetArchitecture.from_plans(old, 1, 25) == UNetArchitecture.from_plans(new, 1, 25)
    residual = dict(old, UNet_class_name="ResidualEncoderUNet")
    with pytest.raises(ModelLoadError, match="ResidualEncoderUNet"):
        UNetArchitecture.from_plans(residual, 1, 25)


# ---------------------------------------------------------------- (d) unsafe checkpoints

class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    zipped, _ = write_release(tmp_path, "Dataset297_TotalSegmentator_total_3mm_1559subj", ["spleen"],
                              spacing=[3.0] * 3, extra={"_best_ema": _RunsCode(marker)})
    with pytest.raises(UnsafeCheckpointError, match="refused") as info:
        convert(zipped, tmp_path / "out")
    assert "system" in str(info.value)
    assert not marker.exists()
    assert not (tmp_path / "out" / "Dataset297_TotalSegmentator_total_3mm_1559subj").exists()
    # an nnU-Net-shaped checkpoint with numpy scalars in its log loads under the allowlist
    good, _ = write_release(tmp_path / "good", "Dataset1_x", ["spleen"], spacing=[3.0] * 3, as_zip=False)
    checkpoint = load_checkpoint(good / "fold_0" / "checkpoint_final.pth")
    assert float(checkpoint["logging"]["mean_fg_dice"][0]) == pytest.approx(0.41)


# ---------------------------------------------------------------- registry, concepts, weights

def test_registry_concepts_and_contract():
    total = get_backend("totalsegmentator:total")
    assert len(total.concepts()) == 117 and len(get_backend("totalsegmentator:total_mr").concepts()) == 50
    assert set(get_backend("totalsegmentator:total_fast").concepts()) == set(total.concepts())
    assert total.licence == "Apache-2.0" and total.version == "v2.0.0-weights"
    assert total.contract()["spacing_mm"] == [1.5, 1.5, 1.5] and total.contract()["tile_step_size"] == 0.8
    assert get_backend("totalsegmentator:total_fast").contract()["spacing_mm"] == [3.0, 3.0, 3.0]
    with pytest.raises(BackendError, match="Did you mean") as info:
        get_backend("totalsegmentator:totl")
    assert "totalsegmentator:total" in info.value.suggestions
    with pytest.raises(BackendError, match="cannot answer"):
        total.check_concepts(["liver", "left_atrium_wall_typo"])
    # the package's part split is TotalSegmentator's: global ids from the shared class map
    task = get_task("total")
    for part in task.parts:
        lo, hi = TOTAL_PARTS[part.task_id]
        assert list(part.classes) == [class_map("total")[i] for i in range(lo, hi + 1)]
    assert task.class_map == class_map("total") and get_task("total_mr").class_map == class_map("total_mr")


def test_offline_without_weights_names_the_file_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("UNISEGTEXT_OFFLINE", "1")
    backend = get_backend("totalsegmentator:total_fast", cache_dir=tmp_path / "cache")
    assert not backend.weights_ready(["liver"])
    volume = Volume(np.zeros((8, 8, 8), np.float32), np.diag([3.0, 3.0, 3.0, 1.0]), modality="CT")
    with pytest.raises(ModelLoadError) as info:
        backend.predict(volume, ["liver"])
    message = str(info.value)
    assert ("https://github.com/wasserth/TotalSegmentator/releases/download/v2.0.0-weights/"
            "Dataset297_TotalSegmentator_total_3mm_1559subj.zip") in message
    assert str(tmp_path / "cache" / "total_fast" / "downloads") in message


# ---------------------------------------------------------------- (b) masks vs nnU-Net's predictor

def _lps_swapped(volume: Volume) -> Volume:
    """The scan stored LPS-like with its first two axes swapped: flips and a permutation to undo."""
    image = nib.Nifti1Image(volume.array, volume.affine)
    ornt = np.array([[1, -1], [0, -1], [2, 1]])
    moved = image.as_reoriented(ornt)
    return Volume(np.asarray(moved.dataobj), moved.affine, modality=volume.modality)


def _nnunet_reference(release: Path, volume: Volume, task_spacing, tile_step_size: float, tmp_path: Path) -> np.ndarray:
    """TotalSegmentator's path with the peers' own code: its canonical/resampling helpers, nnU-Net's
    SimpleITK reader/writer and nnUNetPredictor."""
    try:  # the peers' own code, installed with --no-deps; skipped where it is not importable
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        from totalsegmentator.alignment import as_closest_canonical, undo_canonical
        from totalsegmentator.resampling import change_spacing
    except ImportError as exc:
        pytest.skip(f"nnunetv2 / totalsegmentator reference not importable ({exc})")

    plans = json.loads((release / "plans.json").read_text())
    dataset_json = json.loads((release / "dataset.json").read_text())
    checkpoint = torch.load(release / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    manager = PlansManager(plans)
    configuration = manager.get_configuration("3d_fullres")
    network = get_network_from_plans(configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                                     configuration.network_arch_init_kwargs_req_import, 1,
                                     len(dataset_json["labels"]), deep_supervision=False)
    network.load_state_dict(checkpoint["network_weights"])
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.manual_initialization(network, manager, configuration, [checkpoint["network_weights"]], dataset_json,
                                    checkpoint["trainer_name"], None)
    img_in_orig = nib.Nifti1Image(volume.array, volume.affine)
    img_in = as_closest_canonical(nib.Nifti1Image(img_in_orig.get_fdata(), img_in_orig.affine))
    img_in_rsp = change_spacing(img_in, list(task_spacing), order=1, dtype=np.int32, nr_cpus=1)
    nib.save(img_in_rsp, tmp_path / "s01_0000.nii.gz")
    io = SimpleITKIO()
    data, props = io.read_images([str(tmp_path / "s01_0000.nii.gz")])
    seg = predictor.predict_single_npy_array(data, props)
    io.write_seg(seg, str(tmp_path / "s01.nii.gz"), props)
    img_pred = nib.load(tmp_path / "s01.nii.gz")
    img_pred = change_spacing(img_pred, list(task_spacing), img_in.shape, order=0, dtype=np.uint8, nr_cpus=1,
                              force_affine=img_in.affine)
    return undo_canonical(img_pred, img_in_orig).get_fdata().astype(np.uint8)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.filterwarnings("ignore:Detected old nnU-Net plans format")
@pytest.mark.parametrize(
    "modality, task_spacing, plans_spacing, transpose, orientation, crop",
    [
        # total_fast-like (3 mm CT, 3 mm model): no resampling at all; the CT's central part
        ("CT", (3.0, 3.0, 3.0), (3.0, 3.0, 3.0), (0, 1, 2), "RAS", (slice(25, 89), slice(20, 76), slice(30, 90))),
        # TotalSegmentator's zoom, then nnU-Net's own order-3 resampling in and order-1 out
        ("CT", (4.5, 4.5, 4.5), (5.0, 4.0, 4.5), (0, 1, 2), "LPS", None),
        # an anisotropic plans spacing (z resampled separately, order 0) and a transposing plan
        ("CT", (6.0, 6.0, 6.0), (22.0, 6.0, 6.0), (2, 0, 1), "RAS", None),
        # total_mr_fast-like on the example MR (LPS, 20 slices: padded to the patch), masked z-score
        ("MR", (3.0, 3.0, 3.0), (3.0, 3.0, 3.0), (0, 1, 2), "as stored", None),
    ],
    ids=["ct-3mm", "ct-resampled-LPS", "ct-separate-z-transposed", "mr-3mm"],
)
def test_masks_equal_nnunet_predictor_on_the_examples(tmp_path, modality, task_spacing, plans_spacing, transpose,
                                                      orientation, crop):
    names = [class_map("total")[i] for i in range(1, 8)]
    folder, _ = write_release(tmp_path, "Dataset297_TotalSegmentator_total_3mm_1559subj", names, seed=7,
                              spacing=plans_spacing, transpose=transpose, as_zip=False, modality=modality,
                              use_mask_for_norm=modality == "MR")
    scan = nib.load(SHARED / ("ct.nii.gz" if modality == "CT" else "mr.nii.gz"))
    if crop is not None:
        scan = scan.slicer[crop]
    volume = Volume(scan.get_fdata(dtype=np.float32), scan.affine, modality=modality)
    if orientation == "LPS":
        volume = _lps_swapped(volume)
    expected = _nnunet_reference(folder, volume, task_spacing, 0.8, tmp_path)

    backend = TotalSegmentatorBackend("total_fast", weights=tmp_path, cache_dir=tmp_path / "cache")
    backend.task = _with_spacing(backend.task, task_spacing, names)
    labels = backend.predict_labels(volume)
    assert labels.shape == volume.shape
    present = [i for i in range(1, len(names) + 1) if (expected == i).any() or (labels == i).any()]
    assert len(present) >= 3, "random weights should give several classes"
    dice = {names[i - 1]: _dice(labels == i, expected == i) for i in present}
    assert min(dice.values()) >= 0.99, dice
    assert np.mean(labels == expected) >= 0.999  # measured: identical on every voxel


def _with_spacing(task, spacing, names):
    """`total_fast`'s spec with another resampling spacing and the fixture's classes."""
    from dataclasses import replace

    part = replace(task.parts[0], classes=tuple(names))
    return replace(task, resample_mm=tuple(spacing), parts=(part,),
                   class_map={i + 1: n for i, n in enumerate(names)})


# ---------------------------------------------------------------- (c) the five-part merge

@pytest.fixture(scope="module")
def five_parts(tmp_path_factory) -> Path:
    """Five tiny random parts following `total`'s split, as release zips in one folder."""
    root = tmp_path_factory.mktemp("total_release")
    names = class_map("total")
    for task_id, (lo, hi) in TOTAL_PARTS.items():
        folder = next(p.folder for p in get_task("total").parts if p.task_id == task_id)
        write_release(root, folder, [names[i] for i in range(lo, hi + 1)], spacing=[1.5] * 3, seed=task_id)
    return root


def test_five_parts_convert_once_and_only_needed_parts_run(five_parts, tmp_path, monkeypatch):
    backend = get_backend("totalsegmentator:total", weights=five_parts, cache_dir=tmp_path / "cache")
    ran = []
    original = PartModel.predict_labels

    def spy(self, *args, **kwargs):
        ran.append(self.dataset_name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PartModel, "predict_labels", spy)
    rng = np.random.default_rng(0)
    volume = Volume(rng.normal(0, 300, (30, 26, 22)).astype(np.float32), np.diag([1.5, 1.5, 1.5, 1.0]), modality="CT")
    maps = backend.predict(volume, ["liver", "vertebra_l1"])
    assert [name[:10] for name in ran] == ["Dataset291", "Dataset292"]
    assert set(maps) == {"liver", "vertebra_l1"}
    assert all(m.shape == volume.shape and m.dtype == np.float32 for m in maps.values())
    assert sorted(backend._parts) == sorted(p.folder for p in get_task("total").parts[:2])
    # converted once, into the cache: a new backend on the same weights reuses the conversion
    configs = sorted((tmp_path / "cache" / "total").glob("from-*/Dataset29*/config.json"))
    assert len(configs) == 2
    stamps = [c.stat().st_mtime_ns for c in configs]
    again = get_backend("totalsegmentator:total", weights=five_parts, cache_dir=tmp_path / "cache")
    again.load_parts(get_task("total").parts[:2])
    assert [c.stat().st_mtime_ns for c in configs] == stamps
    assert get_backend("totalsegmentator:total", cache_dir=tmp_path / "cache").weights_ready(["liver"]) is False


def test_every_class_of_the_five_parts_lands_on_its_concept(five_parts, tmp_path, monkeypatch):
    """Parts return known label stripes; the merged map must follow TotalSegmentator's LUT rule
    (global ids from the shared class map, later parts overwrite) and each concept must get
    exactly the voxels of its class."""
    from unisegtext.knowledge import load_tree

    names = class_map("total")
    starts = {task_id: lo for task_id, (lo, _) in TOTAL_PARTS.items()}
    sizes = {task_id: hi - lo + 1 for task_id, (lo, hi) in TOTAL_PARTS.items()}
    order = list(TOTAL_PARTS)

    block = 4 * 26 + 2

    def stripes(task_id: int, x: np.ndarray) -> np.ndarray:
        # part i labels its classes twice over, 2 voxels each, from block*i - 6 on: the 6 voxels
        # before its block may hold the previous part's last labels, which it must overwrite
        start = block * order.index(task_id)
        inside = (x >= start - 6) & (x < start + 4 * sizes[task_id])
        return np.where(inside, (x - start) // 2 % sizes[task_id] + 1, 0)

    def fake_predict(self, image, spacing, **kwargs):  # image (z, y, x); stripes along x
        task_id = int(self.dataset_name[7:10])
        x = np.broadcast_to(np.arange(image.shape[2]), image.shape)
        return stripes(task_id, x).astype(np.uint8)

    monkeypatch.setattr(PartModel, "predict_labels", fake_predict)
    backend = get_backend("totalsegmentator:total", weights=five_parts, cache_dir=tmp_path / "cache")
    nx = block * 5 + 10
    volume = Volume(np.zeros((nx, 2, 2), np.float32), np.diag([1.5, 1.5, 1.5, 1.0]), modality="CT")
    maps = backend.predict(volume, backend.concepts())

    x = np.arange(nx)
    expected = np.zeros(nx, dtype=int)
    for task_id in order:  # TotalSegmentator's merge, independently
        local = stripes(task_id, x)
        expected = np.where(local > 0, starts[task_id] + local - 1, expected)
    concept_of = {n: c.id for c in load_tree() for n in c.totalseg}
    seen = set()
    for gid, name in names.items():
        concept = concept_of[name]
        np.testing.assert_array_equal(maps[concept][:, 0, 0], (expected == gid).astype(np.float32), err_msg=name)
        if (expected == gid).any():
            seen.add(gid)
    assert len(seen) == 117
    overwritten = stripes(292, x) > 0
    assert np.any(overwritten & (stripes(293, x) > 0))  # the overwrite rule was exercised


def test_part_labels_must_match_the_task(tmp_path):
    wrong = [class_map("total")[i] for i in range(2, 6)]  # shifted: not part 297's map
    write_release(tmp_path, "Dataset297_TotalSegmentator_total_3mm_1559subj", wrong, spacing=[3.0] * 3)
    backend = get_backend("totalsegmentator:total_fast", weights=tmp_path, cache_dir=tmp_path / "cache")
    volume = Volume(np.zeros((8, 8, 8), np.float32), np.diag([3.0, 3.0, 3.0, 1.0]), modality="CT")
    with pytest.raises(ModelLoadError, match="do not match TotalSegmentator's class map"):
        backend.predict(volume, ["liver"])


# ---------------------------------------------------------------- pieces vs nnU-Net's functions

def test_triple_split_reassembles_the_volume():
    backend = get_backend("totalsegmentator:total")
    shape = (512, 512, 901)
    chunks = backend._chunks(shape)
    assert len(chunks) == 3 and backend._chunks((512, 512, 900))[0][0] == slice(None)
    z = np.arange(shape[2])
    out = np.full_like(z, -1)
    for read, write, keep in chunks:
        out[write] = z[read][keep]
    np.testing.assert_array_equal(out, z)


def test_window_positions_gaussian_padding_and_resampling_match_nnunet():
    try:
        from acvl_utils.cropping_and_padding.padding import pad_nd_image
        from nnunetv2.inference.sliding_window_prediction import (
            compute_gaussian,
            compute_steps_for_sliding_window,
        )
        from nnunetv2.preprocessing.resampling.default_resampling import (
            resample_data_or_seg_to_shape,
        )
    except ImportError as exc:
        pytest.skip(f"nnunetv2 not importable ({exc})")

    for size, tile, step in [((122, 101, 112), (40, 32, 48), 0.8), ((48, 33, 200), (48, 32, 64), 0.5), ((7,), (7,), 0.8)]:
        assert nn_ref.compute_steps(size, tile, step) == compute_steps_for_sliding_window(size, tile, step)
    ours = nn_ref.gaussian_importance((40, 32, 48))
    theirs = compute_gaussian((40, 32, 48), 1.0 / 8, 10, dtype=torch.float16, device=torch.device("cpu"))
    assert torch.equal(ours, theirs)
    image = torch.randn(2, 20, 33, 7)
    padded, unpad = nn_ref.pad_to_patch(image, (24, 32, 10))
    theirs, their_unpad = pad_nd_image(image, (24, 32, 10), "constant", {"value": 0}, True, None)
    assert torch.equal(padded, theirs) and unpad[1:] == their_unpad[1:]
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 9, 14, 11)).astype(np.float32)
    for new_shape, old_sp, new_sp, kwargs in [
        ((12, 10, 11), (1, 1, 1), (0.8, 1.3, 1), {"order": 3, "order_z": 0, "force_separate_z": None}),
        ((3, 14, 16), (1, 1, 1), (3.5, 1, 0.7), {"order": 3, "order_z": 0, "force_separate_z": None}),
        ((12, 10, 11), (1, 1, 1), (0.8, 1.3, 1), {"order": 1, "order_z": 0, "force_separate_z": None}),
    ]:
        ours = nn_ref.resample_to_shape(data, new_shape, old_sp, new_sp, **kwargs)
        theirs = resample_data_or_seg_to_shape(data, new_shape, old_sp, new_sp, is_seg=False, **kwargs)
        np.testing.assert_array_equal(ours, theirs)


def test_benchmark_script_runs_on_a_tiny_volume(tmp_path, capsys):
    import runpy

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "totalseg_bench.py"
    bench = runpy.run_path(str(script), run_name="totalseg_bench")
    out = tmp_path / "bench.json"
    assert bench["main"](["--size", "24", "--plan", "tiny", "--tasks", "total_fast", "--threads", "1",
                          "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["runs"][0]["task"] == "total_fast" and report["runs"][0]["labels_shape"] == [24, 24, 24]
    assert "total_fast" in capsys.readouterr().out


def test_our_own_network_answers_through_the_same_interface():
    from unisegtext.models import UniSegText

    torch.manual_seed(0)
    backend = get_backend("unisegtext", weights=UniSegText.from_preset("tiny"), device="cpu")
    assert backend.licence == "Apache-2.0" and "liver" in backend.concepts()
    assert set(backend.contract()) >= {"orientation", "spacing_mm", "normalisation", "patch_size", "tile_step_size"}
    volume = Volume(np.random.default_rng(0).normal(0, 300, (20, 18, 16)).astype(np.float32),
                    np.diag([2.0, 2.0, 2.0, 1.0]), modality="CT")
    maps = backend.predict(volume, ["liver", "kidney"])
    assert set(maps) == {"liver", "kidney"}
    assert all(m.shape == volume.shape and m.dtype == np.float32 and 0 <= m.min() <= m.max() <= 1
               for m in maps.values())
