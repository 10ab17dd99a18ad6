"""The `unisegtext` command line."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from unisegtext.cli import main


def test_segment_multilabel_on_input_grid(ct_path, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["segment", "-i", str(ct_path), "-o", str(out), "-p", "liver", "-p", "spleen",
                 "--model", str(tiny_model_dir), "--ml", "--quiet"])
    assert code == 0
    seg = nib.load(str(out / "segmentation.nii.gz"))
    ref = nib.load(str(ct_path))
    assert seg.shape == ref.shape == (122, 101, 112)
    assert np.allclose(seg.affine, ref.affine)
    assert int(seg.header["sform_code"]) == int(ref.header["sform_code"])
    assert int(seg.header["qform_code"]) == int(ref.header["qform_code"])
    labels = json.loads((out / "labels.json").read_text())
    assert labels["labels"] == {"0": "background", "1": "liver", "2": "spleen"}
    assert set(labels["prompts"]) == {"liver", "spleen"} and labels["prompts"]["spleen"]["label"] == 2
    assert all(isinstance(v["present"], bool) and 0 <= v["presence_probability"] <= 1 for v in labels["prompts"].values())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-i", "/no/such/scan.nii.gz", "-p", "liver"], "does not exist"),
        (["-i", "{ct}"], "no prompts"),
        (["-i", "{ct}", "-p", "zzqx blorp"], "does not name a known"),
        (["-i", "{ct}", "-p", "liver", "--overlap", "1.5"], "overlap"),
    ],
)
def test_bad_input_one_line_error(argv, message, ct_path, tiny_model_dir, tmp_path, capsys):
    argv = [a.replace("{ct}", str(ct_path)) for a in argv]
    code = main(["segment", *argv, "-o", str(tmp_path / "out"), "--model", str(tiny_model_dir), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_corrupt_file_error(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    code = main(["segment", "-i", str(bad), "-o", str(tmp_path / "o"), "-p", "liver", "--model", str(tiny_model_dir)])
    assert code == 2
    assert "corrupt" in capsys.readouterr().err


def test_info_json(tiny_model_dir, capsys):
    assert main(["info", "--model", str(tiny_model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["torch"]
    assert info["model"]["parameters"]["backbone"] > 0


def test_info_names_the_concepts_learnt_from_few_scans(tmp_path, capsys):
    from unisegtext.models import UniSegText

    model = UniSegText.from_preset("tiny")
    model.config.concepts = ["liver", "vertebra_l1"]
    model.config.concept_training_scans = {"liver": 22, "vertebra_l1": 1}
    model.save_pretrained(tmp_path / "m")
    assert main(["info", "--model", str(tmp_path / "m")]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("learnt from fewer than 5")]
    assert line and line[0].endswith(" 1: vertebra_l1")


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "unisegtext", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "unisegtext" in proc.stdout
