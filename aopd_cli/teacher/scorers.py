"""Scorers: for given prompt + response sequences, a frozen model's top-K ids and log-probs and the
log-prob of each sampled token on the response positions (`TeacherTopK`, defined with the objectives).
They score the teacher, and the frozen base of ExOPD (its token log-probs). The teacher scores on
`teacher.engine`:

- `hf`: an HF model in-process. It runs the decoder once per micro-batch, then computes logits
  `chunk_size` positions at a time, so at most `chunk_size x V` float32 logits are alive (at 8k-token
  responses and V = 152k, a whole micro-batch of logits would take tens of GB).
- `vllm`: an in-process vLLM engine (`max_logprobs` = K), asked for `prompt_logprobs=K` on prompt +
  response: per position the actual token's log-prob and the top-K, at temperature 1.
- `server`: the same request to a vLLM server (`teacher.url`, or one aopd starts for the stage), in
  requests of `teacher.request_sequences` sequences, `teacher.max_in_flight` at once.

All three return the same `TeacherTopK` on the same batch (ids equal but for exact ties; float32
log-probs to ~1e-5). A scorer is just a function of a micro-batch; remote engines are given a rank's
whole step at once (`score_rows`), so they can batch it.

    python -m pytest tests/test_vllm.py -q -k teacher
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from aopd_cli.errors import UserError
from aopd_cli.training.distributed import is_sharded
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
            logp_CV = torch.log_softmax((hidden_NH[start:stop] @ weight_VH.T).float(), dim=-1)
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
        from aopd_cli.teacher.openai_server import check_server, served_model

        url = teacher.url.rstrip("/")
        check_server(url, served_model(url, teacher.timeout_s), student.tokenizer,
                     _clamped(top_k, student), teacher.timeout_s)
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
    from aopd_cli.teacher.openai_server import check_server, served_model, teacher_url
    from aopd_cli.training.models import compute_dtype

    dtype = str(compute_dtype(teacher_cfg.dtype, student.device)).removeprefix("torch.")
    with teacher_url(teacher_cfg, k, dtype, log_dir / "teacher_server.log") as url:
        model = served_model(url, teacher_cfg.timeout_s)
        check_server(url, model, student.tokenizer, k, teacher_cfg.timeout_s)
        yield server_scorer(url, model, k, vocabulary_of(student), teacher_cfg)


def score_rows(score: Scorer, micro_batches: list[MicroBatch], whole: MicroBatch) -> None:
    """Score a rank's whole step in one call (`whole`: all its rows) and hand each micro-batch its rows."""
    scores = score(whole)
    for micro in micro_batches:
        width = micro.mask_BT.shape[1]  # response columns start at 0 in every micro-batch
        micro.teacher = TeacherTopK(scores.token_logprobs[micro.rows_B, :width],
                                    scores.topk_ids[micro.rows_B, :width], scores.topk_logprobs[micro.rows_B, :width])


def vllm_scorer(llm, k: int, vocabulary: int) -> Scorer:
    from vllm import SamplingParams

    from aopd_cli.rollout.vllm_engine import kept_rng

    params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=k, flat_logprobs=True)

    def score(micro: MicroBatch) -> TeacherTopK:
        rows = _sequences(micro)
        scored = [row for row in rows if row[2]]
        outputs = []
        if scored:
            with kept_rng():
                outputs = llm.generate([{"prompt_token_ids": ids} for ids, _, _ in scored], params, use_tqdm=False)
        results = iter([_from_flat(output.prompt_logprobs, start, count, k)
                        for output, (_, start, count) in zip(outputs, scored)])
        return _assemble([next(results) if count else None for _, _, count in rows], micro, k, vocabulary)

    return score


def server_scorer(url: str, model: str, k: int, vocabulary: int, teacher_cfg) -> Scorer:
    from aopd_cli.teacher.openai_server import ServerError, request

    def post(chunk):
        payload = {"model": model, "prompt": [ids for ids, _, _ in chunk], "max_tokens": 1, "temperature": 1.0,
                   "prompt_logprobs": k}
        try:
            answer = request(f"{url}/v1/completions", payload, timeout=teacher_cfg.timeout_s,
                             retries=teacher_cfg.retries)
        except ServerError as err:
            raise UserError(f"teacher server {url}: scoring failed (after {teacher_cfg.retries} retries): {err}"
                            ) from None
        choices = sorted(answer["choices"], key=lambda choice: choice["index"])  # answers may come in any order
        return [_from_json(choice["prompt_logprobs"], ids, start, count, k)
                for choice, (ids, start, count) in zip(choices, chunk)]

    def score(micro: MicroBatch) -> TeacherTopK:
        rows = _sequences(micro)
        scored = [row for row in rows if row[2]]
        size = teacher_cfg.request_sequences
        chunks = [scored[start:start + size] for start in range(0, len(scored), size)]
        with ThreadPoolExecutor(max(1, min(teacher_cfg.max_in_flight, len(chunks)))) as pool:
            results = iter([result for chunk in pool.map(post, chunks) for result in chunk])
        return _assemble([next(results) if count else None for _, _, count in rows], micro, k, vocabulary)

    return score


def vocabulary_of(student) -> int:
    """Rows of the student's output layer: the ids a scorer may rank."""
    return student.model.get_output_embeddings().weight.shape[0]


def _clamped(top_k: int, student) -> int:
    # vLLM with max_logprobs above the vocabulary lets an oversize K crash the engine's step
    return min(top_k, vocabulary_of(student))


def _sequences(micro: MicroBatch) -> list[tuple[list[int], int, int]]:
    """Per row: the real tokens (prompt + counted response), where the response starts, its length."""
    rows = []
    for ids_L, attn_L in zip(micro.ids_BL.tolist(), micro.attn_BL.tolist()):
        prompt = [t for t, a in zip(ids_L[:micro.first_target], attn_L[:micro.first_target]) if a]
        count = sum(attn_L[micro.first_target:])  # the counted response is a prefix of the response columns
        rows.append((prompt + ids_L[micro.first_target:micro.first_target + count], len(prompt), count))
    return rows


def _from_flat(entries, start: int, count: int, k: int):
    """vLLM's flat prompt log-probs: position t >= 1 holds [the actual token, top-1 .. top-K]."""
    logprobs = torch.tensor(entries.logprobs, dtype=torch.float32).view(-1, k + 1)[start - 1:start - 1 + count]
    ids = torch.tensor(entries.token_ids, dtype=torch.long).view(-1, k + 1)[start - 1:start - 1 + count]
    return logprobs[:, 0], ids[:, 1:], logprobs[:, 1:]


def _from_json(entries, ids: list[int], start: int, count: int, k: int):
    """The server's prompt log-probs: per position {str(id): {logprob, rank}} (the actual token merged in)."""
    token, top_ids, top_logprobs = [], [], []
    for position in range(start, start + count):
        row = entries[position]
        token.append(row[str(ids[position])]["logprob"])
        by_rank = {}
        for token_id, value in row.items():  # one id per rank 1..K (an exact tie may add the actual token)
            if value["rank"] <= k:
                by_rank.setdefault(value["rank"], (int(token_id), value["logprob"]))
        ranked = [by_rank[rank] for rank in sorted(by_rank)]
        top_ids.append([token_id for token_id, _ in ranked])
        top_logprobs.append([logprob for _, logprob in ranked])
    return torch.tensor(token), torch.tensor(top_ids, dtype=torch.long), torch.tensor(top_logprobs)


def _assemble(results, micro: MicroBatch, k: int, vocabulary: int) -> TeacherTopK:
    """[B, T] / [B, T, K] tensors from each row's response scores (positions past a row's end stay 0)."""
    batch, width = micro.ids_BL.shape[0], micro.ids_BL.shape[1] - micro.first_target
    token_BT = torch.zeros(batch, width)
    ids_BTK = torch.zeros(batch, width, k, dtype=torch.long)
    logprobs_BTK = torch.zeros(batch, width, k)
    for row, result in enumerate(results):
        if result is not None:
            token, ids, logprobs = result
            token_BT[row, :len(token)], ids_BTK[row, :len(token)], logprobs_BTK[row, :len(token)] = token, ids, logprobs
    if ids_BTK.numel() and int(ids_BTK.max()) >= vocabulary:
        raise UserError(f"the teacher ranks token id {int(ids_BTK.max())}, past the student's vocabulary of "
                        f"{vocabulary}: teacher and student must share the vocabulary")
    return TeacherTopK(token_BT, ids_BTK, logprobs_BTK)
