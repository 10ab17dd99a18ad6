"""Exact resume after an interruption, and DDP on 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import tiny_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory, shared_data) -> Path:
    from unisegtext.training.sources import build_cache

    folder = tmp_path_factory.mktemp("cache_dist")
    config = tiny_config(folder, shared_data / "totalseg_examples")
    build_cache(config.data.sources, folder, (6.0, 6.0, 6.0))
    return folder


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_interrupt_then_resume_is_exact(tmp_path, cache, shared_data):
    """N steps straight == N/2 steps, stop, resume, N/2 steps: identical weights and metrics."""
    from unisegtext.training.trainer import train

    config = tiny_config(cache, shared_data / "totalseg_examples", max_steps=6)
    straight = train(config, tmp_path / "straight", device="cpu")

    first = train(config, tmp_path / "resumed", max_steps=3, device="cpu")
    assert first.stopped_by == "step_limit" and first.final_dir is None
    resumed = train(config, tmp_path / "resumed", resume=True, device="cpu")
    assert resumed.steps == straight.steps == 6

    a, b = _weights(straight.final_dir), _weights(resumed.final_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    # the metrics of the resumed run continue the interrupted one
    lines_a = (tmp_path / "straight" / "metrics.csv").read_text().splitlines()
    lines_b = (tmp_path / "resumed" / "metrics.csv").read_text().splitlines()
    losses_a = [line.split(",")[2] for line in lines_a[1:]]
    losses_b = [line.split(",")[2] for line in lines_b[1:]]
    assert losses_a == losses_b


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cache: str, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch.distributed as dist

    from unisegtext.training.trainer import train

    config = tiny_config(Path(cache), Path(root), max_steps=3)
    try:
        result = train(config, out, device="cpu")
        state = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
        torch.save({"state": state, "loss": result.last_loss}, Path(out) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_identical_parameters(tmp_path, cache, shared_data):
    import torch.multiprocessing as mp

    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(cache), str(shared_data / "totalseg_examples"), str(out)),
             nprocs=2, join=True)
    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    assert np.isfinite(r0["loss"]) and r0["loss"] == pytest.approx(r1["loss"])
    initial = None
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), f"{key} differs between ranks"
    # and training changed the trainable weights (the ranks did not merely both stay at init)
    from unisegtext.models import UniSegText
    from unisegtext.training.trainer import build_model, seed_everything

    config = tiny_config(cache, shared_data / "totalseg_examples")
    seed_everything(config.seed)
    initial = build_model(config, []).state_dict()
    changed = [k for k in initial if "backbone" in k and not torch.equal(initial[k], r0["state"][k])]
    assert changed
    assert isinstance(UniSegText.from_pretrained(out / "final"), UniSegText)
    # the ranks drew different patches: metrics are written by rank 0 only
    assert (out / "metrics.csv").read_text().count("\n") == 1 + 3
