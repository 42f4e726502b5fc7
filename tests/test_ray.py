"""Sweeps and pipelines as Ray Jobs (`--executor ray`), for real: a two-node Ray cluster on 127.0.0.1 (fake
GPUs, a custom resource per node, token authentication) with a real `mlflow server`, where a sweep's
children run under torchrun on different nodes, a rerun submits nothing, a killed driver's rerun attaches,
and a cancelled child ends KILLED and resumes; the lab's smoke pipeline on a Ray aopd starts itself, equal
to the local executor's and with independent stages side by side; what that Ray exposes; bad input.

    python -m pytest tests/test_ray.py -q
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from cli_runs import marked_processes, wait_for
from test_tracking import free_port, start_server, stop_server

from aopd_cli.config.compose import load_experiment
from aopd_cli.tracking.store import connect

pytestmark = pytest.mark.slow  # Ray clusters, MLflow servers and torchrun children: minutes


def kill_marked(marker: str) -> None:
    signal_all(marked_processes(marker), signal.SIGKILL)  # Ray's daemons outlive a SIGTERM by tens of seconds


@pytest.fixture(scope="module")
def two_nodes(ray_installed):
    """A head and a worker node on 127.0.0.1, 2 fake GPUs and 2 CPUs each, node_a / node_b resources."""
    # a short folder: Ray's sockets live under it, and a Unix socket's path holds 107 bytes at most
    root, marker = Path(tempfile.mkdtemp(prefix="aopd-ray-", dir="/tmp")), uuid.uuid4().hex
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_USAGE_STATS_ENABLED": "0", "AOPD_TEST_MARKER": marker}
    ray = str(Path(sys.executable).with_name("ray"))
    gcs, dashboard = free_port(), free_port()
    common = ["--num-cpus", "2", "--num-gpus", "2", "--disable-usage-stats", "--dashboard-agent-listen-port"]
    try:
        for node in (["--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
                      "--dashboard-port", str(dashboard), "--include-dashboard", "true", "--temp-dir", str(root / "t"),
                      "--resources", '{"node_a": 1}'],
                     ["--address", f"127.0.0.1:{gcs}", "--resources", '{"node_b": 1}']):
            started = subprocess.run([ray, "start", *node, *common, str(free_port())], env=env, capture_output=True,
                                     text=True, timeout=180)
            assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-3000:]
        yield f"http://127.0.0.1:{dashboard}", {k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    finally:
        kill_marked(marker)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    port = free_port()
    server = start_server(tmp_path_factory.mktemp("mlflow"), port)
    yield f"http://127.0.0.1:{port}"
    stop_server(server)


def aopd(*args, cwd, env, timeout=900):
    return subprocess.run([sys.executable, "-m", "aopd_cli.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def ray_jobs(address: str, token_env: dict, group: str) -> list:
    """The cluster's jobs of one group (in a process of its own: Ray reads its token when imported)."""
    script = ("import json, sys; from ray.job_submission import JobSubmissionClient\n"
              "jobs = JobSubmissionClient(sys.argv[1]).list_jobs()\n"
              "print(json.dumps([{'id': j.submission_id, 'status': str(getattr(j.status, 'value', j.status)), "
              "'node': j.driver_node_id} for j in jobs if (j.submission_id or '').startswith(sys.argv[2])]))")
    result = subprocess.run([sys.executable, "-c", script, address, f"aopd-{group}-"], capture_output=True, text=True,
                            env={**os.environ, **token_env}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def sweep_args(checkpoint, out: Path, uri: str, *extra) -> list[str]:
    return [f"student.path={checkpoint}", f"teacher.path={checkpoint}", "train.batch_size=8",
            "train.micro_batch_size=4", "objective.top_k=4", "eval.limit=4", "eval.n=2", "eval.k=[1]",
            "train.eval_every=0", "rollout.max_new_tokens=16", "eval.max_new_tokens=16", f"tracking.uri={uri}",
            f"output_dir={out}", "threads=1", *extra]


def children_runs(uri: str, sweep: str) -> list:
    """The sweep's parent run and its children's runs."""
    client = connect(uri)
    experiment = client.get_experiment_by_name("aopd").experiment_id
    return [run for tag in ("sweep_parent", "sweep_id") for run in client.search_runs([experiment],
                                                                                     f"tags.{tag} = '{sweep}'")]


def test_a_sweep_runs_as_ray_jobs_on_two_nodes_attaches_after_a_killed_driver_and_resumes_a_cancelled_child(
        two_nodes, mlflow_server, tiny_checkpoint, lab_cache, tmp_path, request):
    address, token_env = two_nodes
    marker = uuid.uuid4().hex  # the children's (Ray's own processes carry the cluster's)
    env = {**os.environ, **token_env, "AOPD_CACHE": str(lab_cache), "AOPD_TEST_MARKER": marker}
    out = tmp_path / "out"
    ray_args = ["--executor", "ray", "--address", address, "--nproc-per-node", "2"]
    first = ["sweep", "distill", "--param", "tau=-1,0", *ray_args,
             *sweep_args(tiny_checkpoint, out, mlflow_server, "train.steps=3")]

    result = aopd(*first, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [record] = (out / "sweeps").glob("*/aopd_jobs.json")
    sweep = json.loads(record.read_text())["group"]
    runs = children_runs(mlflow_server, sweep)
    parents = [r for r in runs if r.data.tags.get("sweep_parent") == sweep]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("sweep_child")]
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.data.tags["world_size"] for r in children} == {"2"}  # torchrun, two ranks each
    jobs = ray_jobs(address, token_env, sweep)
    assert len(jobs) == 2 and {j["status"] for j in jobs} == {"SUCCEEDED"}
    assert len({j["node"] for j in jobs}) == 2, jobs  # two GPUs each: one node each

    again = aopd(*first, cwd=tmp_path, env=env)
    assert again.returncode == 0 and "2 already done" in again.stdout, again.stdout[-2000:]
    assert len(ray_jobs(address, token_env, sweep)) == 2  # nothing submitted

    # a longer sweep: its driver killed once both children run, one child cancelled, then the same command again
    second = ["sweep", "distill", "--param", "tau=0.5,1", *ray_args,
              *sweep_args(tiny_checkpoint, out, mlflow_server, "train.steps=60", "train.save_every=2")]
    driver = subprocess.Popen([sys.executable, "-m", "aopd_cli.cli", *second], cwd=tmp_path, env=env,
                              stdout=open(tmp_path / "driver.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)

    def second_folder():
        return next((p.parent for p in (out / "sweeps").glob("*/aopd_jobs.json") if p != record), None)

    wait_for(second_folder, timeout=300, what="the second sweep's record")
    folder = second_folder()
    group, submitted = json.loads((folder / "aopd_jobs.json").read_text())["group"], None
    wait_for(lambda: len([j for j in ray_jobs(address, token_env, group) if j["status"] == "RUNNING"]) == 2,
             timeout=300, what="both children running")
    cancelled, other = sorted(json.loads((folder / "aopd_jobs.json").read_text())["jobs"])
    # the other child is paused until the rerun has attached to it: left running, it could finish first on a fast
    # machine, and the rerun would then find it done (CI did so once) instead of attaching
    wait_for(lambda: child_processes(marker, other), timeout=300, what="the other child's processes")
    paused = pause_child(marker, other)
    request.addfinalizer(lambda: signal_all(paused, signal.SIGCONT))  # should the test fail before it resumes them
    wait_for(lambda: list((folder / cancelled).glob("step_*")), timeout=300, what="a step checkpoint")
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()

    result = aopd("jobs", "cancel", str(folder), cancelled, cwd=tmp_path, env=env)
    assert result.returncode == 0 and "cancelled 1 job" in result.stdout, result.stdout + result.stderr
    assert not [p for p in marked_processes(marker) if f"{cancelled}.json" in " ".join(p.cmdline())]
    [killed] = [r for r in children_runs(mlflow_server, group) if r.data.tags.get("sweep_child") == cancelled]
    assert killed.info.status == "KILLED"
    status = aopd("jobs", "status", str(folder), cwd=tmp_path, env=env)
    assert "cancelled" in status.stdout, status.stdout

    log = tmp_path / "rerun.log"
    with open(log, "w") as stdout:
        rerun = subprocess.Popen([sys.executable, "-m", "aopd_cli.cli", *second], cwd=tmp_path, env=env,
                                 stdout=stdout, stderr=subprocess.STDOUT)
        try:
            # the child still running: attached to, not submitted again
            wait_for(lambda: "attached to" in log.read_text() or rerun.poll() is not None, timeout=300,
                     what="the rerun attaching")
        finally:
            signal_all(paused, signal.SIGCONT)
        assert rerun.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert "attached to" in log.read_text(), log.read_text()[-3000:]
    submitted = sorted(j["id"].removeprefix(f"aopd-{group}-") for j in ray_jobs(address, token_env, group))
    assert submitted == sorted([cancelled, f"{cancelled}.r2", other])
    logs = aopd("jobs", "logs", str(folder), cancelled, cwd=tmp_path, env=env)
    assert "resuming" in logs.stdout and "from step" in logs.stdout, logs.stdout[-2000:]
    runs = children_runs(mlflow_server, group)
    assert {r.info.status for r in runs if r.data.tags.get("sweep_child")} == {"FINISHED"}
    assert [r.info.status for r in runs if r.data.tags.get("sweep_parent")] == ["FINISHED"]
    assert not marked_processes(marker)


def child_processes(marker: str, child: str) -> list:
    """A sweep child's processes: those whose command names its config, and every process under them."""
    import psutil

    found = {}
    for process in marked_processes(marker):
        try:
            if f"{child}.json" in " ".join(process.cmdline()):
                found.update({p.pid: p for p in [process, *process.children(recursive=True)]})
        except psutil.Error:
            pass
    return list(found.values())


def pause_child(marker: str, child: str) -> list:
    """SIGSTOP a sweep child's processes, again until no new one appears (one may start while we list them)."""
    paused: dict = {}
    while new := [p for p in child_processes(marker, child) if p.pid not in paused]:
        signal_all(new, signal.SIGSTOP)
        paused.update({p.pid: p for p in new})
        time.sleep(0.5)
    return list(paused.values())


def signal_all(processes: list, signum: int) -> None:
    import psutil

    for process in processes:
        try:
            process.send_signal(signum)
        except psutil.Error:  # gone already
            pass


def no_runs(uri: str) -> bool:
    client = connect(uri)
    return not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_refusals_come_before_anything_is_submitted(two_nodes, mlflow_server, tiny_checkpoint, lab_cache, tmp_path):
    address, token_env = two_nodes
    env = {**os.environ, **token_env, "AOPD_CACHE": str(lab_cache)}
    base = ["sweep", "distill", "--param", "tau=-1,0"]
    cases = [
        (["--executor", "rya"], "(did you mean 'ray'?)", 2),
        (["--executor", "ray", "--address", f"http://127.0.0.1:{free_port()}"], "no Ray cluster answers there", 1),
        (["--executor", "ray", "--address", address, "--nproc-per-node", "4"], "asks for 4 GPUs", 2),
        (["--executor", "ray", "--address", address], "is a file on this machine", 2),
    ]
    for options, line, code in cases:
        uri = mlflow_server if "GPUs" in line else f"sqlite:///{tmp_path}/refused.db"
        result = aopd(*base, *options, *sweep_args(tiny_checkpoint, tmp_path / "refused", uri), cwd=tmp_path, env=env)
        assert result.returncode == code and line in result.stderr, (options, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "refused").exists()
    relative = aopd(*base, "--executor", "ray", "--address", address,
                    *sweep_args(tiny_checkpoint, "refused", mlflow_server), cwd=tmp_path, env=env)
    assert relative.returncode == 2 and "absolute folder" in relative.stderr, relative.stderr[-2000:]
    assert not (tmp_path / "refused").exists()
    assert not (tmp_path / "refused.db").exists() or no_runs(f"sqlite:///{tmp_path}/refused.db")


def test_without_ray_installed_the_executor_names_the_extra(monkeypatch):
    import importlib.util

    from aopd_cli.errors import UserError
    from aopd_cli.experiment import ray_jobs

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install 'aopd-cli\[cluster\]'"):
        ray_jobs.check_ray()


def final_metrics(uri: str, parent: str) -> dict[str, dict[str, float]]:
    client = connect(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`mlflow.parentRunId` = '{parent}'")
    shared = {stage.name for stage in load_experiment("lab_smoke").stages if stage.shared}  # reused from the cache
    measured = ("time/", "train/tokens_per_s")  # how fast, not what
    return ({r.data.tags["pipeline_stage"]: {k: v for k, v in r.data.metrics.items() if not k.startswith(measured)}
             for r in runs if r.data.tags["pipeline_stage"] not in shared},
            {r.data.tags["pipeline_stage"]: (r.info.start_time, r.info.end_time) for r in runs})


def test_the_smoke_pipeline_on_an_embedded_ray_equals_the_local_one_and_runs_stages_side_by_side(
        ray_installed, lab_cache, tmp_path):
    env = {**os.environ, "AOPD_CACHE": str(lab_cache)}
    results = {}
    for executor in ("local", "ray"):
        uri = f"sqlite:///{tmp_path}/{executor}.db"
        result = aopd("pipeline", "experiment=lab_smoke", "--executor", executor, "threads=1", f"tracking.uri={uri}",
                      f"output_dir={tmp_path / executor}", cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        tables = result.stdout[result.stdout.index("## Table 1"):result.stdout.index("## Wall time")]
        parent = json.loads((tmp_path / executor / "aopd_pipeline.json").read_text())["run_id"]
        results[executor] = (tables, *final_metrics(uri, parent))
    assert results["ray"][0] == results["local"][0]  # Tables 1 and 2
    assert results["ray"][1] == results["local"][1]  # every stage's final metrics, to the last digit
    assert len(results["ray"][1]) == 7 and all(results["ray"][1].values())
    # a stage starts once those it reads from are done: runs that overlap are independent stages side by side
    spans = results["ray"][2]
    assert any(spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1] for a in spans for b in spans if a < b), spans


def test_an_embedded_ray_answers_only_with_its_token_and_its_jobs_see_no_secrets(ray_installed, tmp_path):
    script = (
        "import json, os, subprocess, time, urllib.request\n"
        "from aopd_cli.experiment.ray_jobs import embedded\n"
        "with embedded() as url:\n"
        "    from ray.job_submission import JobSubmissionClient\n"
        "    client = JobSubmissionClient(url)\n"
        "    sid = client.submit_job(entrypoint='env', submission_id='probe')\n"
        "    while not client.get_job_status(sid).is_terminal(): time.sleep(0.2)\n"
        "    env = client.get_job_logs(sid)\n"
        "    try:\n"
        "        code = urllib.request.urlopen(url + '/api/jobs/').status\n"
        "    except urllib.error.HTTPError as err:\n"
        "        code = err.code\n"
        "    pids = {str(p) for p in [os.getpid(), *[c.pid for c in __import__('psutil').Process().children(True)]]}\n"
        "    listening = subprocess.run(['ss', '-ltnpH'], capture_output=True, text=True).stdout.splitlines()\n"
        "    sockets = [line for line in listening if any(f'pid={p},' in line for p in pids)]\n"
        "    answers = {}\n"
        "    for line in sockets:  # what each port says to a request without the token\n"
        "        port = line.split()[3].rsplit(':', 1)[1]\n"
        "        try:\n"
        "            answers[port] = urllib.request.urlopen(f'http://127.0.0.1:{port}/', timeout=3).read(12).decode()\n"
        "        except urllib.error.HTTPError as err:\n"
        "            answers[port] = err.code\n"
        "        except Exception as err:\n"
        "            answers[port] = type(err).__name__\n"
        "    print(json.dumps({'env': env, 'code': code, 'url': url, 'sockets': sockets, 'answers': answers}))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "AWS_SECRET_ACCESS_KEY": "hunter2", "MLFLOW_TRACKING_TOKEN": "kept"})
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["url"].startswith("http://127.0.0.1:")  # the dashboard (the job API) on loopback only
    assert found["code"] == 401  # and refusing a request without the token
    assert "hunter2" not in found["env"] and "MLFLOW_TRACKING_TOKEN=kept" in found["env"]
    exposed = [line for line in found["sockets"] if not line.split()[3].startswith(("127.", "[::1]"))]
    assert exposed, "Ray's GCS and raylet listen on every interface: token authentication is what guards them"
    for line in exposed:
        answer = found["answers"][line.split()[3].rsplit(":", 1)[1]]
        # an HTTP API asks for the token; Prometheus exporters answer metrics, read-only; the rest is gRPC (GCS,
        # raylet, workers), which Ray authenticates with the same token, and answers no HTTP
        assert answer == 401 or answer.startswith("# HELP") or answer.isidentifier(), (line, answer)
    print("\nembedded Ray listening sockets, and what each says without the token:")
    for line in found["sockets"]:
        print(line.split()[3], line.split()[-1], found["answers"][line.split()[3].rsplit(":", 1)[1]])


def test_a_failing_child_leaves_the_others_and_a_rerun_retries_only_it(ray_installed, tiny_checkpoint, lab_cache,
                                                                        tmp_path):
    env = {**os.environ, "AOPD_CACHE": str(lab_cache)}
    args = ["sweep", "distill", "--param", "train.lr=1e-3,1e30", "--executor", "ray",
            *sweep_args(tiny_checkpoint, tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db", "train.steps=2",
                        "train.max_skipped=1")]
    for attempt in (1, 2):
        result = aopd(*args, cwd=tmp_path, env=env)
        assert result.returncode == 1 and "1 of" in result.stderr and "lr=1e+30" in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        sweep = json.loads(next((tmp_path / "out" / "sweeps").glob("*/aopd_jobs.json")).read_text())["group"]
        runs = children_runs(f"sqlite:///{tmp_path}/mlflow.db", sweep)
        good = [r for r in runs if r.data.tags.get("sweep_child") and r.data.tags["sweep.train.lr"] != "1e+30"]
        assert [r.info.status for r in good] == ["FINISHED"]  # the first attempt's, not run again
        assert [r.info.status for r in runs if r.data.tags.get("sweep_parent")] == ["FAILED"]
        assert ("1 already done" in result.stdout) == (attempt == 2)
