"""A stage run's lifecycle: what the run is (its identity), whether it already finished, the output
folder it holds, the resume decision and the tracked run around it.

- Identity (`identity`): a hash of the configuration that changes what a stage computes, and of its
  input models; a finished stage leaves `aopd_done.json` (its identity and result): rerunning it does nothing.
- The session (`stage_session`): one process per output folder (a lock naming the holder), leftovers of
  an interrupted writer removed, and the resume decision: with `resume=auto` a folder that holds an
  earlier run of the same configuration continues from its newest whole checkpoint in the same MLflow
  run; a different configuration, or `resume=never`, keeps the old folder under a new name and starts
  afresh. The tracked run is opened inside the context that closes it (FINISHED, KILLED, FAILED), and
  SIGTERM / SIGINT stop the loop at a step's end with a checkpoint.

    python -m pytest tests/test_resume.py -q
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from aopd_cli.errors import UserError
from aopd_cli.progress import say
from aopd_cli.training import distributed as dist
from aopd_cli.training.checkpoints import CONFIG_FILE, step_dirs, tidy
from aopd_cli.training.interrupts import StopFlag, handled_signals

RUN_FILE, DONE_FILE, LOCK_FILE = "aopd_run.json", "aopd_done.json", ".aopd.lock"
# keys that change what a stage computes; the rest (logging, evaluation, where to write) may change on resume
NOT_IDENTITY = {"tracking", "resume", "output_dir", "eval", "reuse_cached", "threads", "dist_timeout_s"}
TRAIN_NOT_IDENTITY = {"log_every", "eval_every", "save_every", "keep_last", "max_skipped"}


@dataclass
class Session:
    config: object
    out_dir: Path
    tracker: object
    stop: StopFlag
    name: str  # the run's name (the stage's name in a pipeline)
    resume_from: Path | None = None  # a step_N folder, or the final checkpoint (training done)
    start_step: int = 0  # steps done; -1: training finished, only what follows it is left
    parent_run_id: str | None = None  # a pipeline's or sweep's run, which says how to see the runs at its end
    identity: str = ""  # of the configuration and inputs as they were when the run started



# ---------------------------------------------------------------- identity, records
def fingerprint(path: str | Path) -> str:
    """Names, sizes and modification times of a local file or folder's files (a rebuilt input differs)."""
    path = Path(path).expanduser()
    if not path.exists():
        return "absent"
    files = [path] if path.is_file() else sorted(p for p in path.resolve().rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode()
                          ).hexdigest()[:16]


def content_fingerprint(files: list[Path]) -> str:
    """A digest of the files' names and bytes (an edited data file differs, a touched one does not)."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}\0{_file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)}".encode())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """One file's content digest, read once per process for a given size and time (a sweep's children share)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def input_fingerprints(config) -> dict[str, str]:
    """What the stage reads, by key: its model folders (file names, sizes and times: checkpoints are large)
    and the content of every chat template, data and benchmark file (`hub` for a hub dataset, read by name)."""
    from aopd_cli.config.paths import data_sources
    from aopd_cli.data.loaders import source_files
    from aopd_cli.data.prompts import CHAT_TEMPLATES

    found = {}
    for role in ("student", "teacher", "base"):
        model = getattr(config, role, None)
        if model is not None and model.path:
            found[f"{role}.path={model.path}"] = fingerprint(model.path)
        if model is not None and model.chat_template and model.chat_template not in CHAT_TEMPLATES:  # a Jinja file
            template = Path(model.chat_template).expanduser()
            found[f"{role}.chat_template={model.chat_template}"] = \
                content_fingerprint([template]) if template.is_file() else "absent"
    for key, source, kind, split in data_sources(config):
        files = source_files(kind, source, split)
        found[f"{key}={source}"] = "hub" if files is None else content_fingerprint(files)
    return found


def external_fingerprints(configs) -> dict[str, str]:
    """`input_fingerprints` of a pipeline's (or a sweep's) stages, in order, less the checkpoints its own
    stages make: what the whole of it reads from outside."""
    from aopd_cli.config.paths import checkpoints_made

    made: set[Path] = set()
    found = {}
    for config in configs:
        roles = {f"{role}.path={model.path}": Path(model.path).expanduser().resolve()
                 for role in ("student", "teacher", "base")
                 if (model := getattr(config, role, None)) is not None and model.path}
        for key, value in input_fingerprints(config).items():
            if key not in roles or roles[key] not in made:
                found[key] = value
        made |= {path.expanduser().resolve() for path in checkpoints_made(config)}
    return found


def config_digest(config) -> str:
    """The configuration that changes what a stage computes. Evaluation settings are what an eval stage
    computes; for a training stage they only shape its curves (and may change on resume)."""
    exclude = NOT_IDENTITY - ({"eval"} if config.stage == "eval" else set())
    if config.stage == "warmup":  # a warm-up's rollout engine only runs its evaluations
        exclude = exclude | {"rollout"}
    dump = config.model_dump(mode="json", exclude=exclude)
    if "train" in dump:
        dump["train"] = {k: v for k, v in dump["train"].items() if k not in TRAIN_NOT_IDENTITY}
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]


def identity(config, inputs: dict[str, str] | None = None) -> str:
    """The run's identity: its configuration and the fingerprints of what it reads."""
    inputs = input_fingerprints(config) if inputs is None else inputs
    return hashlib.sha256(json.dumps([config_digest(config), inputs], sort_keys=True).encode()).hexdigest()[:16]


def what_changed(record: dict | None, config, inputs: dict[str, str]) -> str:
    """Why an earlier run in the folder is not continued, in a few words."""
    if record is None or "inputs" not in record:
        return "the configuration changed"
    changed = [key for key in inputs if record["inputs"].get(key) != inputs[key]]
    if record.get("config") == config_digest(config) and changed:
        return f"{changed[0]} changed since the earlier run" + (f" (and {len(changed) - 1} more)" if len(changed) > 1
                                                                 else "")
    return "the configuration changed"


def read_record(path: Path) -> dict | None:
    """A JSON record aopd wrote (run, done, pipeline), or None when it is absent; a damaged one (cut by a
    crash, edited by hand) counts as absent, with a line naming it."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        say(f"warning: {path} is damaged (not the JSON aopd wrote): it is ignored")
        return None
    if not isinstance(record, dict):
        say(f"warning: {path} is damaged (not the JSON aopd wrote): it is ignored")
        return None
    return record


def finished_result(config):
    """The result of a finished run of this very configuration in its output folder, else None."""
    from aopd_cli.training.checkpoints import checkpoint_problem
    from aopd_cli.training.sealed import seal_problem

    done = read_record(Path(config.output_dir) / DONE_FILE)
    if done is None or done.get("identity") != identity(config):
        return None
    result = done["result"]
    if isinstance(result, str):  # a checkpoint: still there and whole (a cache can be cleared, or edited)
        path = Path(result)
        return None if checkpoint_problem(path) or (path.is_symlink() and seal_problem(path)) else path
    return result


# ---------------------------------------------------------------- the session
@contextmanager
def output_lock(out_dir: Path):
    """Hold `out_dir` for this process; a second process is refused at once, naming the holder. The lock
    dies with its process, so a stale one is taken over (with a warning)."""
    import fcntl
    import os
    import socket

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    handle = open(path, "a+b")  # bytes: a lock damaged by a crash or a disk error need not be text
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().decode(errors="replace").strip() or "another process"
        handle.close()
        raise UserError(f"output_dir={out_dir} is in use by {holder}; wait for it, or choose another output_dir")
    handle.seek(0)
    previous = handle.read()
    try:
        if previous.strip():
            print(f"aopd: warning: taking over {path} from {previous.decode().strip()}, which is no longer running")
    except UnicodeDecodeError:
        print(f"aopd: warning: {path} is damaged ({len(previous)} bytes that are not text, as a crash or a disk error "
              "leaves them); no process holds it: taking it over")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    handle.flush()
    try:
        yield
    finally:
        handle.seek(0)
        handle.truncate()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _archive(out_dir: Path, why: str) -> None:
    """Move the earlier run's files to a sibling folder (the lock file stays: this process holds it)."""
    target = out_dir.with_name(f"{out_dir.name}.archived-{time.strftime('%Y%m%d-%H%M%S')}")
    target.mkdir()
    for entry in out_dir.iterdir():
        if entry.name != LOCK_FILE:
            entry.rename(target / entry.name)
    say(f"{why}: the earlier run is kept in {target}; starting afresh in {out_dir}")


def _newest(out_dir: Path) -> tuple[Path | None, int]:
    if (out_dir / "checkpoint" / "config.json").is_file():
        return out_dir / "checkpoint", -1  # training finished; -1: the loop has no step left to run
    steps = step_dirs(out_dir, say_damaged=True)  # a damaged newest one is named and passed over
    return (steps[-1][1], steps[-1][0]) if steps else (None, 0)


def end_earlier_run(record: dict, out_dir: Path, continued_in: str = "") -> None:
    """The folder's earlier MLflow run, which this run does not continue in its store: sent what its backlog
    queued and marked KILLED there (the store it was recorded in, maybe not this run's). A store that does not
    answer is named in a warning; when this run goes on in another store (`continued_in`), the earlier run's
    queued records are moved aside (the new run's backlog is its own), for `aopd sync` once it answers."""
    from aopd_cli.tracking.store import DEFAULT_URI, end_run
    from aopd_cli.tracking.tracker import BACKLOG_FILE

    run_id, backlog, where = record["run_id"], out_dir / BACKLOG_FILE, record.get("tracking_uri") or DEFAULT_URI
    problem = end_run(where, run_id, backlog=backlog,
                      tags={"aopd.continued_in": continued_in} if continued_in else None)
    if problem is None:
        if continued_in:
            say(f"the earlier run {run_id} in {where} is marked KILLED: this run continues in {continued_in}")
        return
    kept = ""
    if continued_in and backlog.is_file():
        aside = out_dir / f"backlog-{run_id[:8]}"
        aside.mkdir(exist_ok=True)
        backlog.rename(aside / BACKLOG_FILE)
        kept = f"; its queued records are kept in {aside}: `aopd sync {aside} --tracking-uri {where}` sends them"
    say(f"warning: cannot mark the earlier run {run_id} in {where} as ended ({problem}): it shows RUNNING there"
        + kept)


def _decide(config, out_dir: Path, ident: str, inputs: dict[str, str]) -> tuple[dict | None, Path | None, int]:
    """(the earlier run's record to continue, resume point, steps done), archiving what is not continued."""
    record = read_record(out_dir / RUN_FILE)
    earlier = record is not None or step_dirs(out_dir) or (out_dir / "checkpoint").exists()
    if earlier and (config.resume == "never" or (record or {}).get("identity") != ident):
        if record and record.get("run_id"):
            end_earlier_run(record, out_dir)
        _archive(out_dir, "resume=never" if config.resume == "never" else what_changed(record, config, inputs))
        return None, None, 0
    resume_from, step = _newest(out_dir)
    return record, resume_from, step


@contextmanager
def stage_session(config, *, run_name: str | None, parent_run_id: str | None, tags: dict[str, str] | None = None):
    from aopd_cli.config.compose import flatten, to_yaml
    from aopd_cli.tracking.store import DEFAULT_URI, resume_run, start_run
    from aopd_cli.tracking.tracker import BACKLOG_FILE, NullTracker, closing

    out_dir, inputs = Path(config.output_dir), input_fingerprints(config)
    ident = identity(config, inputs)
    with output_lock(out_dir) if dist.is_main() else nullcontext():
        plan = None
        if dist.is_main():
            tidy(out_dir)
            record, resume_from, step = _decide(config, out_dir, ident, inputs)
            plan = (record, str(resume_from) if resume_from else None, step)
        record, resume_from, step = dist.broadcast(plan)
        resume_from = Path(resume_from) if resume_from else None
        tracker = None
        if dist.is_main() and record and record.get("run_id") and record.get("tracking_uri") == config.tracking.uri:
            tracker = resume_run(config.tracking, record["run_id"], backlog=out_dir / BACKLOG_FILE)
        elif dist.is_main() and record and record.get("run_id"):  # continued in another store: ended in its own
            end_earlier_run(record, out_dir, continued_in=config.tracking.uri or DEFAULT_URI
                            if config.tracking.enabled else "no store (tracking.enabled=false)")
        resumed = tracker is not None
        if tracker is None and dist.is_main():
            all_tags = {**(tags or {}), "stage": config.stage, "seed": str(config.seed),
                        "world_size": str(dist.world_size())}
            objective = getattr(config, "objective", None)
            if objective is not None:
                all_tags["objective"] = objective.name
            for role in ("student", "teacher", "base"):  # a reused warm-up is a link into the cache
                model = getattr(config, role, None)
                if model is not None and model.path and Path(model.path).is_symlink():
                    all_tags[f"{role}.cache_path"] = str(Path(model.path).resolve())
            tracker = start_run(config.tracking, run_name=run_name or config.stage, tags=all_tags,
                                parent_run_id=parent_run_id, backlog=out_dir / BACKLOG_FILE)
        tracker = tracker or NullTracker()
        with closing(tracker), handled_signals() as stop:
            if dist.is_main():
                (out_dir / RUN_FILE).write_text(json.dumps({"identity": ident, "run_id": tracker.run_id,
                                                            "tracking_uri": config.tracking.uri,
                                                            "config": config_digest(config), "inputs": inputs}))
                if not resumed:
                    tracker.log_params(flatten(config.model_dump(mode="json")))
                    (out_dir / CONFIG_FILE).write_text(to_yaml(config))
                    tracker.log_artifact(out_dir / CONFIG_FILE)
                if tracker.run_id and parent_run_id is None:  # a stage on its own: its runs' view, from the start
                    say(f"watch the runs with {_view(config)}")
            if resume_from is not None:
                total = getattr(getattr(config, "train", None), "steps", 0)
                say(f"resuming {run_name or config.stage} from step {total if step < 0 else step} of {total} "
                    f"({resume_from})")
            yield Session(config, out_dir, tracker, stop, run_name or config.stage, resume_from, step, parent_run_id,
                          ident)


def log_dataset(session: Session, context: str, source: str, records: list) -> None:
    """A dataset the stage used, as an MLflow dataset input: its source, rows and a digest of the rows."""
    if dist.is_main():
        digest = hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()[:16]
        session.tracker.log_dataset(Path(source).stem if "/" in source or "." in source else source, source,
                                    len(records), digest, context)


def finish(session: Session, result) -> None:
    """Record the stage as done (its identity and result), so rerunning it does nothing."""
    if dist.is_main():
        value = str(result) if isinstance(result, Path) else result
        (session.out_dir / DONE_FILE).write_text(json.dumps({"identity": session.identity, "result": value,
                                                             "run_id": session.tracker.run_id}))
        say(f"{session.config.stage} done: {session.out_dir}"
            + (f" (MLflow run {session.tracker.run_id})" if session.tracker.run_id else ""))
        if session.tracker.run_id and session.parent_run_id is None:
            say(f"see the runs with {_view(session.config)}")


def _view(config) -> str:
    """The runs table of this kind of stage, and how to open it."""
    from aopd_cli.tracking.runs_view import runs_link, table_columns

    return runs_link(config.tracking, table_columns([config]), f"tags.stage = '{config.stage}'")
