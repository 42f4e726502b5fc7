"""Full disks, damaged locks and a resume across tracking stores (issue 32), each as `aopd distill` in a
subprocess on the lab's tiny checkpoint. The disks are small file systems (a tmpfs of a few MiB) the tests
mount and unmount; where mounting is not permitted those tests are skipped, saying why."""

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from cli_runs import distill_args, run_aopd, start_aopd, wait_for

from aopd_cli.tracking.store import connect
from aopd_cli.training.checkpoints import step_problem

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs at tmp_path/disk, unmounted at the end; `resize(mib)` grows it (room made)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here ({(done.stderr or done.stdout).strip()}): the full-disk cases need one"
        print(reason)
        pytest.skip(reason)

    def resize(mib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={mib}m", str(mount)], check=True)

    yield mount, resize
    if subprocess.run(["umount", str(mount)], capture_output=True, check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    """Writes a file until the disk has no room left."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    return filler


def store_runs(db: Path) -> list:
    client = connect(f"sqlite:///{db}")
    found = client.get_experiment_by_name("aopd")
    return list(client.search_runs([found.experiment_id])) if found else []


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("aopd:")]


def test_a_disk_that_fills_during_a_checkpoint_is_one_line_and_the_rerun_resumes(tmp_path, small_disk, tiny_checkpoint,
                                                                                 lab_cache):
    disk, resize = small_disk
    args = distill_args(tiny_checkpoint, str(disk / "out"), "train.steps=8", "train.save_every=1", "train.keep_last=8")
    full = run_aopd(*args, cwd=tmp_path, cache=lab_cache)
    steps = sorted(disk.glob("out/step_*"), key=lambda p: int(p.name.removeprefix("step_")))
    assert full.returncode == 1 and "Traceback" not in full.stderr and len(errors(full)) == 1, full.stderr[-2000:]
    assert steps and all(step_problem(step) is None for step in steps)  # whole, the partial one removed
    failed = f"step_{int(steps[-1].name.removeprefix('step_')) + 1}"
    assert f"cannot write the checkpoint {failed} in {disk / 'out'}: its disk is full (" in full.stderr
    assert f"the partial {failed} is removed and {steps[-1].name}, the newest whole checkpoint, is kept" in full.stderr
    assert not list(disk.glob("out/.tmp-*"))
    resize(16)
    rerun = run_aopd(*args, cwd=tmp_path, cache=lab_cache)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming distill aopd from {steps[-1].name.replace('_', ' ')} of 8" in rerun.stdout


def test_a_full_tracking_disk_is_an_outage_and_a_full_backlog_one_line(tmp_path, small_disk, tiny_checkpoint,
                                                                       lab_cache):
    disk, _ = small_disk
    store = f"tracking.uri=sqlite:///{disk}/mlflow.db"
    connect(f"sqlite:///{disk}/mlflow.db")  # the store exists; then its disk has no room for a run
    filler = fill(disk)
    refused = run_aopd(*distill_args(tiny_checkpoint, "out", "train.steps=2"), store, cwd=tmp_path, cache=lab_cache)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr and len(errors(refused)) == 1
    assert f"tracking.uri=sqlite:///{disk}/mlflow.db: 0.0 KiB free on its disk, a run's records need about " \
           "1.0 MiB; make room" in refused.stderr and not (tmp_path / "out").exists()
    assert not store_runs(disk / "mlflow.db")

    filler.unlink()  # the disk fills during the run: records wait in the backlog, training goes on
    process = start_aopd(*distill_args(tiny_checkpoint, "out", "train.steps=10"), store, cwd=tmp_path,
                         cache=lab_cache, log=tmp_path / "run.log")
    wait_for(lambda: "step 1/10" in (tmp_path / "run.log").read_text() or process.poll() is not None, what="step 1")
    fill(disk)
    assert process.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-2000:]
    log = (tmp_path / "run.log").read_text()
    assert "aopd: warning: the tracking store does not answer (MlflowException: (sqlite3.OperationalError) " \
           "database or disk is full); training goes on" in log and "Traceback" not in log
    assert (tmp_path / "out/checkpoint/config.json").is_file() and (tmp_path / "out/tracking_backlog.jsonl").is_file()
    (disk / "filler").unlink()
    sent = run_aopd("sync", "out", cwd=tmp_path, cache=lab_cache)
    assert sent.returncode == 0 and "queued record(s) from out" in sent.stdout, sent.stderr[-1000:]
    assert [run.info.status for run in store_runs(disk / "mlflow.db")] == ["FINISHED"]

    # the backlog on the same full disk: nowhere to keep the records, one line
    process = start_aopd(*distill_args(tiny_checkpoint, str(disk / "out2"), "train.steps=10"), store, cwd=tmp_path,
                         cache=lab_cache, log=tmp_path / "run2.log")
    wait_for(lambda: "step 1/10" in (tmp_path / "run2.log").read_text() or process.poll() is not None, what="step 1")
    fill(disk)
    assert process.wait(timeout=600) == 1
    log = (tmp_path / "run2.log").read_text()
    assert f"aopd: the tracking store does not answer and {disk}/out2/tracking_backlog.jsonl cannot be written " \
           "either (No space left on device): the run stops here" in log and "Traceback" not in log, log[-2000:]


def test_a_damaged_lock_is_taken_over_with_a_warning(tmp_path, tiny_checkpoint, lab_cache):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/.aopd.lock").write_bytes(b"\xff\xfe\x00pid 12\x80")  # not UTF-8: a crash or a disk error
    result = run_aopd(*distill_args(tiny_checkpoint, "out", "train.steps=1"), cwd=tmp_path, cache=lab_cache)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "aopd: warning: out/.aopd.lock is damaged (10 bytes that are not text, as a crash or a disk error leaves " \
           "them); no process holds it: taking it over" in result.stdout


def killed_at_step_2(work: Path, out: str, checkpoint, cache, store: str) -> str:
    """A distillation SIGKILLed once its step 2 checkpoint is written (its run left RUNNING); the run's id."""
    process = start_aopd(*distill_args(checkpoint, out, "train.steps=8", "train.save_every=2"), store, cwd=work,
                         cache=cache, log=work / f"{out}.log")
    wait_for(lambda: (work / out / "step_2/meta.json").is_file() or process.poll() is not None, what="step 2")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return json.loads((work / out / "aopd_run.json").read_text())["run_id"]


def test_a_resume_in_another_store_ends_the_earlier_run_there(tmp_path, tiny_checkpoint, lab_cache):
    first = killed_at_step_2(tmp_path, "a", tiny_checkpoint, lab_cache, f"tracking.uri=sqlite:///{tmp_path}/old.db")
    gone = killed_at_step_2(tmp_path, "b", tiny_checkpoint, lab_cache, f"tracking.uri=sqlite:///{tmp_path}/gone.db")
    shutil.move(tmp_path / "gone.db", tmp_path / "elsewhere.db")  # that store is not there any more
    new = f"tracking.uri=sqlite:///{tmp_path}/new.db"
    for out, run_id, line in (
            ("a", first, (f"aopd: the earlier run {first} in sqlite:///{tmp_path}/old.db is marked KILLED: this "
                          f"run continues in sqlite:///{tmp_path}/new.db")),
            ("b", gone, (f"aopd: warning: cannot mark the earlier run {gone} in sqlite:///{tmp_path}/gone.db as "
                         "ended (its file is gone): it shows RUNNING there"))):
        result = run_aopd(*distill_args(tiny_checkpoint, out, "train.steps=8", "train.save_every=2"), new,
                          cwd=tmp_path, cache=lab_cache)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert line in result.stdout and "resuming distill aopd from step" in result.stdout, result.stdout[-2000:]
    old = store_runs(tmp_path / "old.db")
    assert [(r.info.status, r.data.tags["aopd.continued_in"]) for r in old] == [("KILLED", f"sqlite:///{tmp_path}/new.db")]
    assert [r.info.status for r in store_runs(tmp_path / "new.db")] == ["FINISHED", "FINISHED"]
    assert not (tmp_path / "gone.db").exists()  # not made again, empty, by the attempt to mark the run
