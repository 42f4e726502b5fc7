"""Scorers: for given prompt + response sequences, a frozen model's top-K ids and log-probs and the
log-prob of each sampled token on the response positions (`TeacherTopK`, defined with the objectives).
They score the teacher, and the frozen base of ExOPD (its token log-probs). The teacher scores on
`teacher.engine`:

- `hf`: an HF model in-process. It runs the decoder once per micro-batch, then computes logits
  `chunk_size` positions at a time, so at most `chunk_size x V` float32 logits are alive (at 8k-token
  responses and V = 152k, a whole micro-batch of logits would take tens of GB).
- `vllm`: an in-process vLLM engine (`max_logprobs` = K), asked for `prompt_logprobs=K` on prompt +
  response: per position the actual token's log-prob and the top-K, at temperature 1.
- `server`: a teacher served apart (teacher/remote.py): aopd's teacher service (`aopd teacher serve`, packed
  arrays; aopd starts one for the stage when `teacher.url` is empty) or a vLLM OpenAI server at `teacher.url`.

All three return the same `TeacherTopK` on the same batch (ids equal but for exact ties; float32
log-probs to ~1e-5). A scorer is just a function of a micro-batch; remote engines are given a rank's
whole step at once (`score_rows`), so they can batch it.

    python -m pytest tests/test_vllm.py -q -k teacher
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from aopd_cli.errors import UserError
from aopd_cli.teacher.topk import assemble, engine_scores, sequences_of
from aopd_cli.training.distributed import is_sharded
from aopd_cli.training.lm_head import logits_f32
from aopd_cli.training.models import stop_token_ids
from aopd_cli.training.objectives import TeacherTopK
from aopd_cli.training.update import MicroBatch, target_hidden

Scorer = Callable[[MicroBatch], TeacherTopK]


def hf_scorer(policy, top_k: int, chunk_size: int = 1024) -> Scorer:
    @torch.no_grad()
    def score(micro: MicroBatch) -> TeacherTopK:
        was_training = policy.model.training
        policy.model.eval()
        micro = micro.to(policy.device)
        hidden_BTH, weight_VH = target_hidden(policy.model, micro)
        policy.model.train(was_training)
        batch, width = hidden_BTH.shape[:2]
        hidden_NH = hidden_BTH.reshape(batch * width, -1)
        targets_N = micro.targets_BT.reshape(-1)
        k = min(top_k, weight_VH.shape[0])
        token_logp_N = torch.empty(batch * width, dtype=torch.float32, device=hidden_NH.device)
        topk_logp_NK = torch.empty(batch * width, k, dtype=torch.float32, device=hidden_NH.device)
        topk_ids_NK = torch.empty(batch * width, k, dtype=torch.long, device=hidden_NH.device)
        for start in range(0, hidden_NH.shape[0], chunk_size):
            stop = start + chunk_size
            logp_CV = torch.log_softmax(logits_f32(hidden_NH[start:stop], weight_VH), dim=-1)
            token_logp_N[start:stop] = logp_CV.gather(-1, targets_N[start:stop, None]).squeeze(-1)
            topk_logp_NK[start:stop], topk_ids_NK[start:stop] = logp_CV.topk(k, dim=-1)
            del logp_CV
        if is_sharded(policy.model):  # FSDP2 keeps a root gathered for a backward a frozen model never runs
            policy.model.reshard()
        return TeacherTopK(token_logp_N.view(batch, width).cpu(), topk_ids_NK.view(batch, width, k).cpu(),
                           topk_logp_NK.view(batch, width, k).cpu())

    return score


# ---------------------------------------------------------------- the teacher, on its engine
def check_teacher(teacher, student, top_k: int) -> None:
    """One line, before any work, for a teacher its engine cannot serve to this student (HF teachers are
    checked as loaded models, `engine.check_compatible`)."""
    if teacher.engine == "server" and teacher.url:
        check_served(teacher.url.rstrip("/"), teacher, student, _clamped(top_k, student))
        return
    from transformers import AutoConfig, AutoTokenizer

    from aopd_cli.rollout.vllm_engine import check_model

    key = f"teacher.engine={teacher.engine}"
    if teacher.engine == "vllm" and teacher.tensor_parallel_size > 1:
        # an in-process engine is one per trainer process, each scoring its own rows
        raise UserError(f"teacher.tensor_parallel_size={teacher.tensor_parallel_size} needs teacher.engine=server "
                        "(a tensor-parallel server on GPUs of its own); teacher.engine=vllm runs one engine a process")
    try:
        config = AutoConfig.from_pretrained(teacher.path, trust_remote_code=teacher.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(teacher.path, trust_remote_code=teacher.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"teacher.path: cannot load {teacher.path!r}: {str(err)[:300]}") from None
    check_model(config, key, "teacher")
    problems = []
    if config.vocab_size != vocabulary_of(student):
        problems.append(f"output vocabulary {config.vocab_size} vs the student's {vocabulary_of(student)}")
    if tokenizer.get_vocab() != student.tokenizer.get_vocab():
        problems.append(f"tokenizer vocabulary ({len(tokenizer)} tokens vs {len(student.tokenizer)})")
    if stop_token_ids(tokenizer) != student.stop_ids:
        problems.append(f"stop tokens {sorted(stop_token_ids(tokenizer))} vs {sorted(student.stop_ids)}")
    if problems:
        raise UserError("the teacher cannot score the student's tokens: " + "; ".join(problems)
                        + ". Teacher and student must share the tokenizer and vocabulary.")


@contextmanager
def teacher_scorer(teacher_cfg, teacher, student, top_k: int, log_dir: Path):
    """The teacher's scorer on its engine, for the block (an engine or server it starts is stopped at
    the block's end, however it ends). `teacher` is the loaded HF policy (engine=hf only)."""
    if teacher_cfg.engine == "hf":
        yield hf_scorer(teacher, top_k)
        return
    k = _clamped(top_k, student)
    if teacher_cfg.engine == "vllm":
        from aopd_cli.rollout.vllm_engine import start_engine
        from aopd_cli.training.models import compute_dtype

        llm, close = start_engine(
            "teacher.engine=vllm", model=teacher_cfg.path, dtype=compute_dtype(teacher_cfg.dtype, student.device),
            seed=0, max_model_len=teacher_cfg.max_model_len, tensor_parallel_size=teacher_cfg.tensor_parallel_size,
            gpu_memory_utilization=teacher_cfg.gpu_memory_utilization, kv_cache_gib=teacher_cfg.kv_cache_gib,
            max_logprobs=k, trust_remote_code=teacher_cfg.trust_remote_code,
            # ids in, log-probs out: without a tokenizer vLLM does not decode every top-K entry (6x faster)
            skip_tokenizer_init=True)
        try:
            yield vllm_scorer(llm, k, vocabulary_of(student))
        finally:
            close()
        return
    from aopd_cli.teacher.remote import teacher_url
    from aopd_cli.training.models import compute_dtype

    dtype = str(compute_dtype(teacher_cfg.dtype, student.device)).removeprefix("torch.")
    with teacher_url(teacher_cfg, k, dtype, log_dir / "teacher_server.log") as url:
        yield check_served(url, teacher_cfg, student, k)


def check_served(url: str, teacher_cfg, student, k: int) -> Scorer:
    """The scorer of the server at `url` (aopd's teacher service, or a vLLM OpenAI server), checked to
    serve this student with K log-probs a position, before any work."""
    from aopd_cli.teacher.openai_server import check_server, served_model
    from aopd_cli.teacher.remote import check_service, openai_scorer, service_info, service_scorer

    info = service_info(url, teacher_cfg.timeout_s)
    if info is not None:
        check_service(url, info, student.tokenizer, vocabulary_of(student), k)
        return service_scorer(url, k, vocabulary_of(student), teacher_cfg)
    model = served_model(url, teacher_cfg.timeout_s)
    check_server(url, model, student.tokenizer, k, teacher_cfg.timeout_s)
    return openai_scorer(url, model, k, vocabulary_of(student), teacher_cfg)


def score_rows(score: Scorer, micro_batches: list[MicroBatch], whole: MicroBatch) -> None:
    """Score a rank's whole step in one call (`whole`: all its rows) and hand each micro-batch its rows."""
    scores = score(whole)
    for micro in micro_batches:
        width = micro.mask_BT.shape[1]  # response columns start at 0 in every micro-batch
        micro.teacher = TeacherTopK(scores.token_logprobs[micro.rows_B, :width],
                                    scores.topk_ids[micro.rows_B, :width], scores.topk_logprobs[micro.rows_B, :width])


def vllm_scorer(llm, k: int, vocabulary: int) -> Scorer:
    from aopd_cli.rollout.vllm_engine import kept_rng

    def score(micro: MicroBatch) -> TeacherTopK:
        rows = sequences_of(micro)
        scored = [row for row in rows if row[2]]
        with kept_rng():
            results = iter(engine_scores(llm, scored, k) if scored else [])
        return assemble([next(results) if count else None for _, _, count in rows], micro, k, vocabulary)

    return score


def vocabulary_of(student) -> int:
    """Rows of the student's output layer: the ids a scorer may rank."""
    return student.model.get_output_embeddings().weight.shape[0]


def _clamped(top_k: int, student) -> int:
    # vLLM with max_logprobs above the vocabulary lets an oversize K crash the engine's step
    return min(top_k, vocabulary_of(student))
