"""Engines: who runs the cases. Thin layers over :class:`~unisegtext.cohort.cases.CaseRunner`.

``local``: this process, one model load, cases one after another.
``ray``: N Ray actors, each loading the model once, pulling cases from the driver's queue.
Ray restarts an actor whose process dies and retries the case it was running once; a case
that kills its worker twice is recorded as failed and a fresh actor takes the worker's place.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from unisegtext.cohort.cases import CaseOutcome, CaseRunner, RunSettings, write_failed
from unisegtext.cohort.manifest import Case
from unisegtext.errors import ModelLoadError, UniSegError

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")
ACTOR_MAX_RESTARTS = 2      # restarts of one actor after its process died
ACTOR_TASK_RETRIES = 1      # retries of the case that was running when it died
LOST_WORKER = {"host": None, "pid": None}  # recorded by the driver for a case whose worker died

OnReady = Callable[[list[dict[str, Any]]], None]
OnOutcome = Callable[[CaseOutcome], None]


@dataclass(frozen=True)
class RayOptions:
    """Resources of the Ray engine.

    Attributes:
        workers: actors to start (default: as many as the cluster's CPUs, or GPUs when
            `gpus_per_worker` is set, allow; never more than the cases to run).
        address: cluster to join ("auto": the one `ray start` runs on this node; None: use
            the Ray already initialised in this process, else start a local one).
        cpus_per_worker: CPUs reserved per actor (also its torch threads).
        gpus_per_worker: GPUs per actor (fractions share a GPU).
    """

    workers: int | None = None
    address: str | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


def run_local(cases: list[Case], settings: RunSettings, on_ready: OnReady, on_outcome: OnOutcome) -> None:
    """Run every case in this process with one model load."""
    runner = CaseRunner(settings)
    on_ready([runner.ready()])
    for case in cases:
        on_outcome(runner.run(case))


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise UniSegError(
            "engine 'ray' needs Ray, which is not installed; install it with "
            "`pip install 'unisegtext[ray]'` or use --engine local"
        ) from exc
    return ray


def run_ray(cases: list[Case], settings: RunSettings, on_ready: OnReady, on_outcome: OnOutcome,
            options: RayOptions) -> None:
    """Run the cases on Ray actors (see the module docstring for failures)."""
    ray = import_ray()
    from ray.exceptions import RayActorError, RayError

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=options.address, include_dashboard=False, logging_level=logging.WARNING)
    elif options.address:
        logger.warning("Ray is already initialised in this process; address %r is ignored", options.address)
    actors: list[Any] = []
    try:
        actor_class = ray.remote(CaseRunner).options(
            num_cpus=options.cpus_per_worker,
            num_gpus=options.gpus_per_worker,
            max_restarts=ACTOR_MAX_RESTARTS,
            max_task_retries=ACTOR_TASK_RETRIES,
        )
        n_workers = min(len(cases), options.workers or default_workers(ray, options))
        check_resources(ray, options, n_workers)
        actors = [actor_class.remote(settings) for _ in range(n_workers)]
        try:
            on_ready(ray.get([actor.ready.remote() for actor in actors]))
        except RayError as exc:
            raise ModelLoadError(f"the Ray workers could not load the model: {_cause(exc)}") from exc
        logger.info("ray: %d workers on %s", n_workers, ray.cluster_resources())

        queue = deque(cases)
        in_flight: dict[Any, tuple[Any, Case]] = {}
        replacements = len(actors)  # fresh actors allowed for workers lost to crashes

        def submit(actor) -> None:
            case = queue.popleft()
            in_flight[actor.run.remote(case)] = (actor, case)

        for actor in actors:
            if queue:
                submit(actor)
        while in_flight:
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            actor, case = in_flight.pop(ref)
            try:
                outcome = ray.get(ref)
            except RayActorError as exc:
                error = (f"the worker process died while running this case, and again on the retry "
                         f"({_cause(exc)}); see the Ray logs")
                write_failed(settings, case, error, 0.0, LOST_WORKER)
                outcome = CaseOutcome(case.case_id, "failed", 0.0, error)
                ray.kill(actor, no_restart=True)
                actors.remove(actor)
                actor = None
                if replacements and queue:
                    replacements -= 1
                    actor = actor_class.remote(settings)
                    actors.append(actor)
            except RayError as exc:  # not raised by CaseRunner.run itself: Ray could not run it
                error = f"Ray could not run this case: {_cause(exc)}"
                write_failed(settings, case, error, 0.0, LOST_WORKER)
                outcome = CaseOutcome(case.case_id, "failed", 0.0, error)
            on_outcome(outcome)
            if actor is not None and queue:
                submit(actor)
            if not in_flight and queue:
                error = "no Ray worker was left to run this case (they kept dying); see the Ray logs and rerun"
                while queue:
                    case = queue.popleft()
                    write_failed(settings, case, error, 0.0, LOST_WORKER)
                    on_outcome(CaseOutcome(case.case_id, "failed", 0.0, error))
    finally:
        for actor in actors:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(actor, no_restart=True)
        if started_here:
            ray.shutdown()


def check_resources(ray, options: RayOptions, n_workers: int) -> None:
    """Refuse workers the cluster cannot place (they would wait forever)."""
    resources = ray.cluster_resources()
    for name, per_worker, flag in (("CPU", options.cpus_per_worker, "--cpus-per-worker"),
                                   ("GPU", options.gpus_per_worker, "--gpus-per-worker")):
        have = resources.get(name, 0)
        if per_worker and n_workers * per_worker > have:
            fit = int(have // per_worker)
            raise UniSegError(
                f"{n_workers} workers x {per_worker:g} {name}s ({flag}) need {n_workers * per_worker:g} "
                f"{name}s but the Ray cluster has {have:g}; use --workers {max(fit, 1)}"
                + ("" if fit else f" with a smaller {flag}, or add nodes")
            )


def default_workers(ray, options: RayOptions) -> int:
    """As many actors as the cluster's CPUs (or GPUs, with gpus_per_worker) allow."""
    resources = ray.cluster_resources()
    if options.gpus_per_worker:
        return max(1, int(resources.get("GPU", 0) // options.gpus_per_worker))
    return max(1, int(resources.get("CPU", 1) // options.cpus_per_worker))


def _cause(exc: BaseException) -> str:
    """The useful line of a Ray error: the worker's own exception when its traceback is
    included (``unisegtext.errors.ModelLoadError: ...``), else the start of the message."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    if len(lines) > 1 and re.match(r"^[\w.]+(Error|Exception|Exit)\b", last):
        return last[:500]
    return " ".join(text.split())[:300]
