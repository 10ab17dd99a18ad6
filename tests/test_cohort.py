"""Cohort runs (`unisegtext batch`, `unisegtext.cohort`): manifest checks, the results table,
resume, and the same table on the local and the Ray engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from unisegtext.cli import main
from unisegtext.cohort import DONE_MARKER, batch, read_manifest, read_table
from unisegtext.errors import ManifestError, UniSegError

PROMPTS = "liver;spleen"
CASES = ["c1", "c2", "c3", "c4"]  # c4 is a truncated .nii.gz


def write_scan(path: Path, shape: tuple[int, int, int], seed: int) -> Path:
    """A synthetic CT (HU-like noise with a bright blob) at 3 mm."""
    rng = np.random.default_rng(seed)
    array = rng.normal(-200, 150, shape)
    centre = np.array(shape) // 2
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    array[np.linalg.norm(grid - centre, axis=-1) < min(shape) / 4] += 260
    nib.save(nib.Nifti1Image(array.astype(np.int16), np.diag([3.0, 3.0, 3.0, 1.0])), str(path))
    return path


def write_cohort(folder: Path, c3_shape=(40, 40, 32)) -> Path:
    """Four cases, inputs relative to the manifest; c4 is corrupt. Returns the manifest."""
    scans = folder / "scans"
    scans.mkdir(parents=True)
    write_scan(scans / "c1.nii.gz", (40, 40, 32), 1)
    write_scan(scans / "c2.nii.gz", (36, 44, 30), 2)
    write_scan(scans / "c3.nii.gz", c3_shape, 3)
    whole = (scans / "c1.nii.gz").read_bytes()
    (scans / "c4.nii.gz").write_bytes(whole[: len(whole) // 2])  # truncated gzip
    manifest = folder / "cohort.csv"
    manifest.write_text(
        "case_id,input,prompts,modality\n"
        + "".join(f"{c},scans/{c}.nii.gz,{PROMPTS},CT\n" for c in CASES)
    )
    return manifest


def without_runtime(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("runtime_s", "score")} for row in rows]


def marker_times(out: Path) -> dict[str, int]:
    """case id -> mtime of its completion marker (published folders only, not staging ones)."""
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob(f"[!.]*/{DONE_MARKER}")}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return write_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="module")
def local_run(cohort, tiny_model_dir, tmp_path_factory):
    """The 4-case cohort on the local engine, with one torch thread like a 1-CPU Ray worker."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("local") / "out"
        return batch(cohort, out, model=tiny_model_dir, progress=False)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------- manifest
def test_manifest_problems_are_reported_together_with_their_lines(tmp_path, tiny_model_dir):
    write_scan(tmp_path / "a.nii.gz", (20, 20, 20), 0)
    manifest = tmp_path / "bad.csv"
    manifest.write_text(
        "case_id,input,prompts,modality\n"
        "a,a.nii.gz,liver;spleen,CT\n"          # line 2: fine, but its id is reused on line 4
        "b,missing.nii.gz,liver,CT\n"           # line 3: missing file
        "A,a.nii.gz,xyzzy organ;liver,XR\n"     # line 4: duplicate id (case), unknown prompt, modality
        "c,a.nii.gz,xyzzy organ,\n"             # line 5: the same unknown prompt
        ",a.nii.gz,,\n"                         # line 6: no id, no prompts
    )
    out = tmp_path / "out"
    with pytest.raises(ManifestError) as info:
        batch(manifest, out, model=tiny_model_dir, progress=False)
    problems = info.value.problems
    text = str(info.value)
    assert "6 problems" in text and "nothing was run" in text
    assert any("lines 2, 4" in p and "'a' / 'A'" in p and "more than once" in p for p in problems)
    assert any(p.startswith("line 3 (case 'b')") and "missing.nii.gz" in p and "does not exist" in p for p in problems)
    assert any(p.startswith("lines 4, 5") and "'xyzzy organ'" in p and "Did you mean" in p for p in problems)
    assert any(p.startswith("line 4 (case 'A')") and "'XR'" in p for p in problems)
    assert any(p.startswith("line 6") and "case_id is empty" in p for p in problems)
    assert any(p.startswith("line 6") and "no prompts" in p for p in problems)
    assert [int(p.split()[1].rstrip(",:")) for p in problems] == sorted(int(p.split()[1].rstrip(",:")) for p in problems)
    assert not out.exists()  # refused before anything was written


def test_manifest_needs_its_columns(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path\nx,y\n")
    with pytest.raises(ManifestError, match="lacks the column.*case_id, input, prompts"):
        read_manifest(manifest)


def test_manifest_inputs_are_relative_to_its_folder(cohort):
    cases = read_manifest(cohort).cases
    assert [c.case_id for c in cases] == CASES
    assert cases[0].path == cohort.parent / "scans" / "c1.nii.gz"
    assert cases[0].input == "scans/c1.nii.gz"
    assert cases[0].prompts == ("liver", "spleen") and cases[0].modality == "CT"
    assert [c.line for c in cases] == [2, 3, 4, 5]


# ---------------------------------------------------------------------- local engine
def test_table_has_one_row_per_case_and_prompt_and_the_corrupt_case_with_its_error(local_run):
    summary = local_run
    rows = read_table(summary.out_dir / "results.csv")
    assert [(r["case_id"], r["prompt"]) for r in rows] == [(c, p) for c in CASES for p in ("liver", "spleen")]
    assert list(rows[0]) == ["case_id", "input", "prompt", "concept", "volume_ml", "voxels", "presence",
                             "present", "score", "runtime_s", "status", "error"]
    ok = [r for r in rows if r["case_id"] != "c4"]
    assert all(r["status"] == "ok" and r["error"] == "" for r in ok)
    assert all(float(r["volume_ml"]) == pytest.approx(int(r["voxels"]) * 0.027) for r in ok)  # 3 mm voxels
    assert all(float(r["runtime_s"]) > 0 for r in ok)
    assert {r["concept"] for r in rows} == {"liver", "spleen"}
    assert all(0.0 <= float(r["presence"]) <= 1.0 and r["present"] in ("True", "False") for r in ok)
    assert all((r["present"] == "True") == (int(r["voxels"]) > 0) for r in ok)  # uncalibrated: present = not empty
    bad = [r for r in rows if r["case_id"] == "c4"]
    assert all(r["status"] == "failed" and r["volume_ml"] == "" for r in bad)
    assert all("VolumeError" in r["error"] and "c4.nii.gz" in r["error"] and "truncated" in r["error"] for r in bad)
    assert summary.done == ["c1", "c2", "c3"] and summary.failed == ["c4"] and summary.skipped == []
    assert not summary.ok


def test_case_folders_hold_masks_and_a_marker_with_the_weights_hash(local_run, cohort, tiny_model):
    out = local_run.out_dir
    for case in ("c1", "c2", "c3"):
        marker = json.loads((out / case / DONE_MARKER).read_text())
        assert marker["fingerprint"]["weights_sha256"] == tiny_model.weights_sha256
        assert marker["fingerprint"]["prompts"] == ["liver", "spleen"]
        assert [r["prompt"] for r in marker["results"]] == ["liver", "spleen"]
        scan = nib.load(str(cohort.parent / "scans" / f"{case}.nii.gz"))
        liver = nib.load(str(out / case / "liver.nii.gz"))
        assert liver.shape == scan.shape and np.allclose(liver.affine, scan.affine)
        assert int(np.count_nonzero(liver.get_fdata())) == marker["results"][0]["voxels"]
    assert not (out / "c4" / DONE_MARKER).exists()
    assert json.loads((out / "c4" / ".failed.json").read_text())["error"].startswith("VolumeError")
    assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_rerun_skips_finished_cases_and_retries_failed_ones(tiny_model_dir, tmp_path):
    manifest = write_cohort(tmp_path / "cohort")
    out = tmp_path / "out"
    batch(manifest, out, model=tiny_model_dir, progress=False)
    before = marker_times(out)
    again = batch(manifest, out, model=tiny_model_dir, progress=False)
    assert again.skipped == ["c1", "c2", "c3"] and again.done == [] and again.failed == ["c4"]
    assert marker_times(out) == before
    write_scan(tmp_path / "cohort" / "scans" / "c4.nii.gz", (30, 30, 30), 4)  # the scan is repaired
    third = batch(manifest, out, model=tiny_model_dir, progress=False)
    assert third.skipped == ["c1", "c2", "c3"] and third.done == ["c4"] and third.ok
    assert {k: v for k, v in marker_times(out).items() if k in before} == before
    assert all(r["status"] == "ok" for r in read_table(out / "results.csv"))


def test_another_model_redoes_finished_cases(cohort, tiny_model_dir, tmp_path):
    import torch

    from unisegtext.models import UniSegText

    torch.manual_seed(1)
    other = UniSegText.from_preset("tiny").save_pretrained(tmp_path / "other")
    out = tmp_path / "out"
    batch(cohort, out, model=tiny_model_dir, progress=False)
    redo = batch(cohort, out, model=other, progress=False)
    assert redo.skipped == [] and redo.done == ["c1", "c2", "c3"]
    marker = json.loads((out / "c1" / DONE_MARKER).read_text())
    assert marker["fingerprint"]["weights_sha256"] == UniSegText.from_pretrained(other).weights_sha256


def test_interrupted_run_lists_pending_cases_and_resumes(cohort, tiny_model_dir, tmp_path):
    class Stop(Exception):
        pass

    def stop_after_two(outcome, seen=[]):  # noqa: B006 - a counter for this test
        seen.append(outcome.case_id)
        if len(seen) == 2:
            raise Stop

    out = tmp_path / "out"
    with pytest.raises(Stop):
        batch(cohort, out, model=tiny_model_dir, progress=False, callback=stop_after_two)
    rows = read_table(out / "results.csv")  # written on the way out, every case listed
    assert [r["status"] for r in rows[::2]] == ["ok", "ok", "pending", "pending"]
    before = marker_times(out)
    resumed = batch(cohort, out, model=tiny_model_dir, progress=False)
    assert resumed.skipped == ["c1", "c2"] and resumed.done == ["c3"] and resumed.failed == ["c4"]
    assert {k: v for k, v in marker_times(out).items() if k in before} == before


def test_killed_run_finishes_the_rest_without_redoing_finished_cases(tiny_model_dir, tmp_path):
    """SIGKILL the CLI after two cases; the rerun does the other two only."""
    manifest = write_cohort(tmp_path / "cohort", c3_shape=(96, 96, 80))  # c3 takes a while
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "unisegtext", "batch", "--manifest", str(manifest), "-o", str(out),
         "--model", str(tiny_model_dir), "--quiet"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    try:
        while len(marker_times(out)) < 2:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the run did not finish two cases in time"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    finished = marker_times(out)
    assert sorted(finished) == ["c1", "c2"]
    assert not (out / "results.csv").exists()  # killed: no table yet, no half-written c3
    assert not (out / "c3").exists()
    resumed = batch(manifest, out, model=tiny_model_dir, progress=False)
    assert resumed.skipped == ["c1", "c2"] and resumed.done == ["c3"] and resumed.failed == ["c4"]
    assert {k: v for k, v in marker_times(out).items() if k in finished} == finished
    assert [r["status"] for r in read_table(out / "results.csv")[::2]] == ["ok", "ok", "ok", "failed"]
    assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_cli_exit_codes_and_problem_list(cohort, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["batch", "--manifest", str(cohort), "-o", str(out), "--model", str(tiny_model_dir), "--quiet"]) == 1
    assert len(read_table(out / "results.csv")) == 8
    bad = tmp_path / "bad.csv"
    bad.write_text("case_id,input,prompts\nx,nope.nii.gz,liver\ny,nope2.nii.gz,liver\n")
    capsys.readouterr()
    assert main(["batch", "--manifest", str(bad), "-o", str(out), "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and "line 2 (case 'x')" in err and "line 3 (case 'y')" in err
    assert len(err.strip().splitlines()) == 3  # the summary, then one line per problem


def test_local_engine_refuses_ray_options(cohort, tiny_model_dir, tmp_path):
    with pytest.raises(UniSegError, match="--workers.*only apply to --engine ray"):
        batch(cohort, tmp_path / "out", model=tiny_model_dir, workers=2, progress=False)
    with pytest.raises(UniSegError, match="engine 'spark' is unknown"):
        batch(cohort, tmp_path / "out", model=tiny_model_dir, engine="spark", progress=False)


def test_public_api_exposes_batch():
    import unisegtext
    import unisegtext.cli.batch  # noqa: F401 - importing the CLI module must not shadow the function

    assert unisegtext.batch is batch
    assert callable(unisegtext.batch)


def test_parquet_table_matches_csv(local_run):
    pq = pytest.importorskip("pyarrow.parquet")
    table = pq.read_table(local_run.out_dir / "results.parquet").to_pylist()
    assert [(r["case_id"], r["prompt"], r["status"]) for r in table] == \
        [(r["case_id"], r["prompt"], r["status"]) for r in local_run.rows]
    assert table[0]["voxels"] == local_run.rows[0]["voxels"]


# ---------------------------------------------------------------------- ray engine
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_ray_gives_the_same_table_as_local(ray_cluster, cohort, local_run, tiny_model_dir, tmp_path):
    summary = batch(cohort, tmp_path / "out", model=tiny_model_dir, engine="ray", workers=2, progress=False)
    assert len(summary.workers) == 2 and len({w["pid"] for w in summary.workers}) == 2
    assert without_runtime(summary.rows) == without_runtime(local_run.rows)
    for ray_row, local_row in zip(summary.rows, local_run.rows):
        if local_row["score"] is None:  # a failed case or an empty mask has no score
            assert ray_row["score"] is None
        else:
            assert ray_row["score"] == pytest.approx(local_row["score"], rel=1e-4)
    assert sorted(summary.done) == ["c1", "c2", "c3"] and summary.failed == ["c4"]
    assert read_table(summary.out_dir / "results.csv")[6]["error"].startswith("VolumeError")


@pytest.mark.slow
def test_ray_interrupted_run_resumes(ray_cluster, cohort, tiny_model_dir, tmp_path):
    class Stop(Exception):
        pass

    done = []

    def stop_after_two(outcome):
        done.append(outcome.case_id)
        if len(done) == 2:
            raise Stop

    out = tmp_path / "out"
    with pytest.raises(Stop):
        batch(cohort, out, model=tiny_model_dir, engine="ray", workers=2, progress=False, callback=stop_after_two)
    finished = marker_times(out)
    assert set(done) <= set(finished) | {"c4"}
    resumed = batch(cohort, out, model=tiny_model_dir, engine="ray", workers=2, progress=False)
    assert set(resumed.skipped) == set(finished)
    assert sorted(resumed.skipped + resumed.done + resumed.failed) == CASES
    assert {k: v for k, v in marker_times(out).items() if k in finished} == finished
    assert [r["status"] for r in resumed.rows[::2]] == ["ok", "ok", "ok", "failed"]


@pytest.mark.slow
def test_ray_worker_killed_mid_run_still_gives_every_row(ray_cluster, tiny_model_dir, tmp_path):
    """SIGKILL a worker once it has finished a case: Ray restarts it and retries its case."""
    folder = tmp_path / "cohort"
    folder.mkdir()
    ids = [f"k{i}" for i in range(8)]
    for i, case in enumerate(ids):
        write_scan(folder / f"{case}.nii.gz", (64, 64, 56), i)
    manifest = folder / "cohort.csv"
    manifest.write_text("case_id,input,prompts\n" + "".join(f"{c},{c}.nii.gz,{PROMPTS}\n" for c in ids))
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_first_worker():
        deadline = time.monotonic() + 240
        while not killed and time.monotonic() < deadline:
            for marker in out.glob(f"[!.]*/{DONE_MARKER}"):
                pid = json.loads(marker.read_text())["worker"]["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_first_worker, daemon=True)
    killer.start()
    summary = batch(manifest, out, model=tiny_model_dir, engine="ray", workers=2, progress=False)
    killer.join()
    assert killed and killed[0] in {w["pid"] for w in summary.workers}
    assert summary.ok and sorted(summary.done) == ids
    assert [r["status"] for r in summary.rows] == ["ok"] * 16
    pids = {json.loads((out / c / DONE_MARKER).read_text())["worker"]["pid"] for c in ids}
    assert pids - {w["pid"] for w in summary.workers}, "the restarted worker ran cases"
    assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))]


# ---------------------------------------------------------------------- benchmark script
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "batch_bench.py"


def test_batch_benchmark_defaults():
    import runpy

    parser = runpy.run_path(str(BENCH), run_name="batch_bench")["build_parser"]()
    args = parser.parse_args([])
    assert args.copies == 16 and args.model == "unisegtext-nano" and args.workers == 2
    assert args.engines == ["batch-local", "segment-cli", "batch-ray"]
    assert args.out == "benchmarks/results/batch_cpu.json"


@pytest.mark.slow
def test_batch_benchmark_runs(tiny_model_dir, tmp_path, capsys):
    import runpy

    bench = runpy.run_path(str(BENCH), run_name="batch_bench")
    report = bench["main"](["--copies", "1", "--model", str(tiny_model_dir), "--engines", "batch-local",
                            "segment-cli", "--out", str(tmp_path / "bench.json")])
    assert [r["engine"] for r in report["rows"]] == ["batch-local", "segment-cli"]
    assert all(r["scans_per_minute"] > 0 for r in report["rows"])
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == report["rows"]
    assert "scans/min" in capsys.readouterr().out
