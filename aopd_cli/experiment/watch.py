"""`aopd jobs status|logs|cancel GROUP [CHILD]`: the Ray Jobs of a sweep or pipeline run with `--executor
ray`, found through the record its driver keeps in the group's folder (`ray_jobs.RECORD`), while the driver
runs or after it died; on a cluster (`--address`), whenever the cluster keeps them.

    aopd jobs status outputs/lab
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from aopd_cli.errors import UserError
from aopd_cli.experiment.ray_jobs import RECORD, STATES, STOP_WAIT_S, _status, attempts, check_ray
from aopd_cli.progress import say


def find_record(name: str) -> tuple[Path, dict]:
    """The record of a sweep (its id) or of a pipeline (its output folder, or its id among Ray jobs)."""
    candidates = [Path(name), Path("outputs") / "sweeps" / name, *Path("outputs").glob("*"),
                  *Path("outputs").glob("sweeps/*")]
    for folder in candidates:
        path = folder / RECORD
        if path.is_file():
            record = json.loads(path.read_text())
            if folder == Path(name) or record.get("group") == name or folder.name == name:
                return folder, record
    raise UserError(f"aopd jobs {name}: no Ray jobs are recorded for it: give a sweep's id (outputs/sweeps/ID) or "
                    "the output folder of a pipeline run with --executor ray")


@contextmanager
def recorded_client(folder: Path, record: dict):
    """A client of the cluster the record's jobs ran on (an embedded Ray's token, from its folder)."""
    check_ray()
    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    token = folder / ".ray_token"
    if record.get("embedded") and token.is_file():  # before Ray is imported, which reads them once
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token.read_text())
    from ray.job_submission import JobSubmissionClient

    try:
        try:
            client = JobSubmissionClient(record["address"])
        except (ConnectionError, RuntimeError, ValueError):
            gone = ("it stopped with the command that started it" if record.get("embedded") else "is it still up?")
            raise UserError(f"aopd jobs: the Ray at {record['address']} that ran group {record['group']} does not "
                            f"answer ({gone})") from None
        yield client
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def _chosen(record: dict, child: str | None) -> dict[str, dict]:
    jobs = record["jobs"]
    if child is None:
        return jobs
    chosen = {job_id: job for job_id, job in jobs.items() if child in (job_id, job["child"], job["label"])}
    if not chosen:
        from aopd_cli.config.suggest import did_you_mean

        names = sorted({job["child"] for job in jobs.values()})
        raise UserError(f"aopd jobs: no job or child {child!r} in group {record['group']}"
                        f"{did_you_mean(child, names)}; it has {', '.join(names)}")
    return chosen


def jobs_status(name: str, child: str | None = None) -> str:
    folder, record = find_record(name)
    with recorded_client(folder, record) as client:
        runs = attempts(client, record["group"])
        lines = [f"group {record['group']} on {record['address']}", "",
                 f"{'job':<28} {'child':<12} {'state':<14} {'attempts':>8}  label"]
        for job_id, job in _chosen(record, child).items():
            found = runs.get(job_id, [])
            state = STATES.get(_status(found[-1].status), "?") if found else "not submitted"
            lines.append(f"{job_id:<28} {job['child']:<12} {state:<14} {len(found):>8}  {job['label']}")
    return "\n".join(lines)


def jobs_logs(name: str, child: str, follow: bool = False) -> None:
    import asyncio

    folder, record = find_record(name)
    chosen = _chosen(record, child)
    with recorded_client(folder, record) as client:
        runs = attempts(client, record["group"])
        for job_id in chosen:
            if not runs.get(job_id):
                say(f"{job_id}: not submitted")
                continue
            sid = runs[job_id][-1].submission_id
            if not follow:
                sys.stdout.write(client.get_job_logs(sid))
                continue

            async def tail(sid=sid):
                async for lines in client.tail_job_logs(sid):
                    sys.stdout.write(lines)
                    sys.stdout.flush()

            asyncio.run(tail())


def jobs_cancel(name: str, child: str | None = None) -> None:
    """Stop the chosen jobs still pending or running: SIGTERM to each job's processes (a stage checkpoints
    and ends its run KILLED), SIGKILL after STOP_WAIT_S."""
    folder, record = find_record(name)
    chosen = _chosen(record, child)
    with recorded_client(folder, record) as client:
        runs = attempts(client, record["group"])
        stopping = [runs[job_id][-1].submission_id for job_id in chosen if runs.get(job_id)
                    and _status(runs[job_id][-1].status) in ("PENDING", "RUNNING")]
        for sid in stopping:
            client.stop_job(sid)
            say(f"cancelling {sid}")
        live, deadline = list(stopping), time.time() + STOP_WAIT_S + 30
        while live and time.time() < deadline:
            live = [sid for sid in live if _status(client.get_job_status(sid)) in ("PENDING", "RUNNING")]
            time.sleep(0.5)
    say(f"still stopping: {', '.join(live)}" if live else
        f"cancelled {len(stopping)} job(s) of group {record['group']}")
