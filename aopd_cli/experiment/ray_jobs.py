"""Jobs on Ray (`--executor ray`): each job is a Ray Job whose command is `aopd job SPEC` (under torchrun
for `nproc` > 1), submitted once every job it waits for has finished, with the processors it takes
(`entrypoint_num_gpus` where the cluster has GPUs, else CPUs: the stage's `threads`).

- Its submission id comes from the job's identity (`aopd-GROUP-JOB`, `.r2`... for retries): Ray refuses a
  second job of one id, so a rerun of the command attaches to the jobs still running, skips those whose
  stage finished (its output folder says so), and submits again only what failed or was cancelled.
- Without `--address`, aopd starts a Ray of its own on this machine for the command and stops it after.
  Ray's GCS and raylet listen on every interface, so it runs with token authentication (a token made for
  it: the dashboard on 127.0.0.1, every port refusing requests without the token), and its processes see
  only the environment a stage needs (`child_environment`): a driver's cloud keys never reach a child.
- With `--address` (a cluster every node of which runs aopd's Python environment at the same path), what
  one node writes must be where the others read: a tracking store that is a file here, a relative output
  folder and a cache of warm-ups on each node's own disk are refused before anything is submitted.
- A job's record (`aopd_jobs.json` in the group's folder) lets `aopd jobs status|logs|cancel` find it.

    aopd sweep distill --param tau=-1,0 --executor ray threads=1 train.steps=5
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from aopd_cli.errors import ConfigError, UserError
from aopd_cli.progress import say

RECORD = "aopd_jobs.json"
POLL_S = 2.0
STOP_WAIT_S = 60  # Ray's grace between SIGTERM and SIGKILL when a job is cancelled: a stage checkpoints in it
# what a child's environment keeps of the driver's (prefixes), besides the basics an embedded Ray's processes
# get; never CUDA_VISIBLE_DEVICES in a job's own variables, which would undo the GPUs Ray gives the job
CHILD_PREFIXES = ("AOPD_", "MLFLOW_TRACKING_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "NCCL_",
                  "VLLM_", "OMP_", "TOKENIZERS_")
BASICS = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV",
          "CUDA_VISIBLE_DEVICES")
TERMINAL = {"SUCCEEDED": "finished", "FAILED": "failed", "STOPPED": "cancelled"}
STATES = {"PENDING": "pending", "RUNNING": "running", **TERMINAL}  # Ray's job states as aopd says them


def check_ray() -> None:
    """Ray with its job API (ray[default]) is installed; not imported yet: Ray reads its authentication mode
    from the environment once, when imported."""
    from importlib.util import find_spec

    if find_spec("ray") is None or find_spec("aiohttp") is None:
        raise UserError("--executor ray needs Ray with its job API: pip install 'aopd-cli[cluster]'")


def child_environment(environ: dict[str, str] | None = None, *, basics: bool = True) -> dict[str, str]:
    """The variables a stage needs of `environ` (this process's): aopd's, MLflow's credentials, the hub's,
    torch's, NCCL's, vLLM's, and with `basics` paths, locale and the GPUs this process sees (an embedded
    Ray's own environment; a job's variables leave them to the node). Not cloud keys, SSH agents or other
    tokens."""
    environ = dict(os.environ if environ is None else environ)
    return {k: v for k, v in environ.items() if (basics and k in BASICS) or k.startswith(CHILD_PREFIXES)}


# ---------------------------------------------------------------- the cluster
@contextmanager
def cluster(address: str | None):
    """(JobSubmissionClient, address) of the cluster at `address`, or of a Ray started on this machine for
    the block (then stopped, with the jobs it runs)."""
    check_ray()
    if address:
        from ray.job_submission import JobSubmissionClient

        try:
            client = JobSubmissionClient(address)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UserError(f"--address {address}: no Ray cluster answers there ({str(err).splitlines()[0]})") from None
        yield client, client.get_address()
        return
    with embedded() as url:
        from ray.job_submission import JobSubmissionClient

        yield JobSubmissionClient(url), url


@contextmanager
def embedded():
    """A Ray on this machine for the block: its processes get `child_environment` and a token of its own."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = secrets.token_hex(24)
    driver_env = dict(os.environ)
    os.environ.clear()  # what Ray's processes inherit, so what every job's command sees
    os.environ.update({**child_environment(driver_env), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                       "RAY_USAGE_STATS_ENABLED": "0"})
    say("ray: starting a Ray on this machine for the command (token authentication, dashboard on 127.0.0.1)")
    import ray  # after the token is set: Ray reads it when imported

    try:
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 log_to_driver=False, logging_level="ERROR")
    finally:
        os.environ.clear()
        os.environ.update({**driver_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})  # the client's
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        ray.shutdown()
        for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
            if name in driver_env:
                os.environ[name] = driver_env[name]
            else:
                os.environ.pop(name, None)


def nodes(address: str) -> list[dict[str, float]]:
    """Each live node's resources."""
    from ray.util.state import list_nodes

    return [dict(n.resources_total) for n in list_nodes(address=address, detail=True) if n.state == "ALIVE"]


def check_jobs(jobs, node_resources: list[dict[str, float]], remote: bool) -> None:
    """One line, before anything is submitted, for a job no node can run or whose files other nodes miss."""
    gpus = max((r.get("GPU", 0) for r in node_resources), default=0)
    for job in jobs:
        if gpus and job.nproc > gpus:
            raise ConfigError(f"{job.label}: asks for {job.nproc} GPUs (--nproc-per-node), and the largest node of "
                              f"the cluster has {gpus:g}")
        if not remote:
            continue
        uri = job.config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")  # MLflow's default reads it
        if job.config.tracking.enabled and (uri is None or not re.match(r"^(https?|postgresql|mysql|mssql)(\+\w+)?://",
                                                                        uri)):
            raise ConfigError(f"--address: tracking.uri={uri or 'sqlite:///mlflow.db (the default)'} is a file on "
                              "this machine, which the cluster's nodes do not share: use an MLflow server "
                              "(tracking.uri=http://HOST:5000) or a database server (postgresql://...)")
        if not Path(job.config.output_dir).is_absolute():
            raise ConfigError(f"--address: output_dir={job.config.output_dir} is relative to this machine's "
                              "folder: give an absolute folder on a file system every node mounts "
                              "(output_dir=/shared/aopd/...)")
        if getattr(job.config, "reuse_cached", False) and not Path(os.environ.get("AOPD_CACHE", "~")).is_absolute():
            raise ConfigError(f"--address: {job.label} reuses cached warm-ups, which live in AOPD_CACHE (each "
                              "node's ~/.cache/aopd): set AOPD_CACHE to a folder on a file system every node mounts")


# ---------------------------------------------------------------- submitting and following
def submission_prefix(group: str, job_id: str = "") -> str:
    """`aopd-GROUP-JOB`, and `.rN` after it for the N-th attempt (a job id holds no dot)."""
    return f"aopd-{group}-{job_id}" if job_id else f"aopd-{group}-"


def attempts(client, group: str) -> dict[str, list]:
    """The group's Ray jobs by aopd job id, oldest attempt first."""
    found: dict[str, list] = {}
    prefix = submission_prefix(group)
    for details in client.list_jobs():
        sid = details.submission_id or ""
        if sid.startswith(prefix):
            job_id = re.sub(r"\.r\d+$", "", sid[len(prefix):])
            found.setdefault(job_id, []).append(details)
    for runs in found.values():
        runs.sort(key=lambda d: d.start_time or 0)
    return found


def entrypoint(spec: Path, nproc: int, here: bool) -> str:
    """The job's command: `aopd job SPEC` (under torchrun for `nproc` > 1), in this folder when the job runs on
    this machine (`here`; on a cluster every path is absolute)."""
    python = shlex.quote(sys.executable)
    run = f"-m torch.distributed.run --standalone --nproc-per-node {nproc} -m aopd_cli" if nproc > 1 else "-m aopd_cli"
    command = f"{python} {run} job {shlex.quote(str(spec.resolve()))}"
    return f"cd {shlex.quote(os.getcwd())} && {command}" if here else command


@contextmanager
def ray_runner(address: str | None):
    """(check, run) of the Ray executor for the block (`executors.Runner`): the cluster connected (or
    started) first, so a refusal comes before any run or folder exists."""
    with cluster(address) as (client, url):
        resources = nodes(url)

        def run(jobs, *, group: str, root: Path, done=lambda job, seconds: None) -> dict[str, float]:
            return run_on_ray(client, url, jobs, group=group, root=root, embedded=address is None,
                              has_gpus=any(r.get("GPU", 0) for r in resources), done=done)

        yield (lambda jobs: check_jobs(jobs, resources, remote=address is not None)), run


def run_on_ray(client, url: str, jobs, *, group: str, root: Path, embedded: bool, has_gpus: bool, done
               ) -> dict[str, float]:
    """Submit each job once those it waits for finished, follow them all to their end, say the counts as they
    change; raise naming the jobs that did not finish."""
    from aopd_cli.stages.lifecycle import finished_result

    state = {job.job_id: ("finished" if finished_result(job.config) is not None else "waiting") for job in jobs}
    submitted: dict[str, str] = {}  # job id -> its submission id now
    timings: dict[str, float] = {}
    earlier = attempts(client, group)
    _write_record(root, group, url, embedded, jobs, submitted)
    shown = None
    try:
        while any(s in ("waiting", "pending", "running") for s in state.values()):
            for job in jobs:
                if state[job.job_id] != "waiting":
                    continue
                if any(state[a] in ("failed", "cancelled", "blocked") for a in job.after):
                    state[job.job_id] = "blocked"
                elif all(state[a] == "finished" for a in job.after):
                    submitted[job.job_id] = _submit_or_attach(client, group, job, root, has_gpus, embedded,
                                                              earlier.get(job.job_id, []))
                    state[job.job_id] = "pending"
                    _write_record(root, group, url, embedded, jobs, submitted)
            for job in jobs:
                if state[job.job_id] not in ("pending", "running"):
                    continue
                info = client.get_job_info(submitted[job.job_id])
                state[job.job_id] = STATES.get(_status(info.status), "pending")
                if state[job.job_id] == "finished":
                    timings[job.job_id] = ((info.end_time or 0) - (info.start_time or 0)) / 1000
                    done(job, timings[job.job_id])
            counts = _counts(state)
            if counts != shown:
                say(f"ray: {counts}")
                shown = counts
            time.sleep(POLL_S if any(s in ("pending", "running") for s in state.values()) else 0)
    except KeyboardInterrupt:
        if embedded:  # the jobs die with the Ray this command started: stopped as a signal stops a stage
            for sid in submitted.values():
                client.stop_job(sid)
        raise
    failed = [job for job in jobs if state[job.job_id] in ("failed", "cancelled", "blocked")]
    if failed:
        names = ", ".join(f"{job.label} ({state[job.job_id]})" for job in failed)
        raise UserError(f"{len(failed)} of {len(jobs)} jobs did not finish: {names}; the others did. A log: aopd jobs "
                        f"logs {root} {failed[0].job_id}; rerun the same command to run only these again")
    return timings


def _submit_or_attach(client, group: str, job, root: Path, has_gpus: bool, here: bool, earlier: list) -> str:
    """The submission id the job runs as: one still running or pending (a rerun attaches), else a new one."""
    from aopd_cli.experiment.job_spec import write_spec

    latest = earlier[-1] if earlier else None
    if latest is not None and _status(latest.status) in ("PENDING", "RUNNING"):
        say(f"ray: {job.label}: attached to {latest.submission_id}, still {_status(latest.status).lower()}")
        return latest.submission_id
    sid = submission_prefix(group, job.job_id) + (f".r{len(earlier) + 1}" if earlier else "")
    spec = write_spec(job, root / ".jobs")
    threads = getattr(job.config, "threads", None) or 1
    try:
        client.submit_job(entrypoint=entrypoint(spec, job.nproc, here), submission_id=sid,
                          runtime_env={"env_vars": {**child_environment(basics=False),
                                                    "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S),
                                                    # torchrun's own grace before it SIGKILLs its ranks (30 s)
                                                    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(STOP_WAIT_S)}},
                          entrypoint_num_gpus=job.nproc if has_gpus else 0,
                          entrypoint_num_cpus=threads * job.nproc if not has_gpus else job.nproc,
                          metadata={"aopd_group": group, "aopd_job": job.job_id, "aopd_label": job.label[:200]})
    except RuntimeError as err:
        if "already exists" not in str(err):
            raise UserError(f"ray: {job.label}: the cluster refused the job: {str(err).splitlines()[0][:300]}"
                            ) from None
        say(f"ray: {job.label}: {sid} exists already: attached")
    return sid


def _status(status) -> str:
    return getattr(status, "value", str(status))


def _counts(state: dict[str, str]) -> str:
    order = ("running", "finished", "waiting", "pending", "failed", "cancelled", "blocked")
    counts = {name: sum(1 for s in state.values() if s == name) for name in order}
    words = {"waiting": "waiting for other jobs", "pending": "waiting for room on the cluster"}
    return ", ".join(f"{counts[name]} {words.get(name, name)}" for name in order if counts[name] or name in order[:3])


def _write_record(root: Path, group: str, url: str, embedded: bool, jobs, submitted: dict[str, str]) -> None:
    """What `aopd jobs` needs to find the group's jobs: the cluster, the jobs and their submission ids (an
    embedded Ray's token in a file only this user reads, while it runs)."""
    root.mkdir(parents=True, exist_ok=True)
    record = {"group": group, "address": url, "embedded": embedded,
              "jobs": {job.job_id: {"label": job.label, "child": job.child or job.job_id,
                                    "submission_id": submitted.get(job.job_id)} for job in jobs}}
    (root / RECORD).write_text(json.dumps(record, indent=1))
    if embedded:
        token = root / ".ray_token"
        token.touch(mode=0o600)
        token.write_text(os.environ.get("RAY_AUTH_TOKEN", ""))
