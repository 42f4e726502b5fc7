"""The rollout-score-update loop that `distill` and `continual` share. Each step samples
`train.batch_size` prompts, rolls out the sampler the objective asks for (the student, or the teacher for
seqkd; the dataset's reference responses with probability 1 - lmbda for gkd), scores the sequences with
the teacher (and the frozen base for exopd), grades them where the objective needs correctness flags,
computes the objective over micro-batches with the whole batch's normaliser, steps the optimizer and
syncs the rollout weights. What an objective needs comes from `objectives.OBJECTIVES`, never its name.

    aopd distill objective=opd train.steps=10
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from aopd_cli import metrics as names
from aopd_cli.data.loaders import load_data
from aopd_cli.data.prompts import chat_ids, math_messages, tool_turns
from aopd_cli.errors import ConfigError, UserError
from aopd_cli.eval.math import grade_math
from aopd_cli.eval.tools import grade_turn
from aopd_cli.rollout.engines import make_rollout, one_at_a_time
from aopd_cli.rollout.interface import Rollout, RolloutBatch, left_pad, mask_through_first_stop, right_pad
from aopd_cli.stages.lifecycle import log_dataset
from aopd_cli.stages.preflight import check_benchmark_prompts, context_of, fit_prompts
from aopd_cli.teacher.scorers import check_teacher, hf_scorer, score_rows, teacher_scorer, vocabulary_of
from aopd_cli.training import distributed as dist
from aopd_cli.training.batches import micro_batches
from aopd_cli.training.loop import StepBatch, sample_indices, train_loop
from aopd_cli.training.models import check_compatible, load_policy, seed_everything
from aopd_cli.training.objectives import OBJECTIVES, flat, global_normalizer, objective_loss
from aopd_cli.training.update import MicroBatch

ADVANTAGE_SAMPLE = 200_000  # advantages kept for the histogram


@dataclass
class Prepared:
    records: list[dict]  # one per prompt (a tool record: one per assistant turn)
    prompts: list[list[int]]  # their token ids, through the chat template
    student: object
    teacher: object | None
    base: object | None


def prepare(config) -> Prepared:
    """Seeds, the prompts (math for distill, tools for continual) and the models, checked before any run
    or work starts: a missing dataset or checkpoint, a teacher with another vocabulary, a top-K past the
    vocabulary or a prompt past the model's context stops here."""
    seed_everything(config.seed)
    records = load_data(config.data, "prompts" if config.stage == "distill" else "tool_train")
    spec = OBJECTIVES[config.objective.name]
    if spec.references and config.objective.lmbda < 1 and not all(r.get("reference") for r in records):
        raise UserError(f"objective.lmbda={config.objective.lmbda} mixes in the dataset's reference responses, but "
                        f"data {config.data.source!r} has none for some prompts (DeepMath's r1_solution_1 gives them); "
                        "use objective.lmbda=1")
    student, teacher, base = load_models(config)
    if config.stage != "distill":  # one prompt per assistant turn: a call after the golden history, or the answer
        records = tool_turns(records, config.data.prompt_style)
    prompts = [chat_ids(student.tokenizer, math_messages(r["problem"], config.data.prompt_suffix)
                        if config.stage == "distill" else r["messages"], add_generation_prompt=True) for r in records]
    vllm_limit = config.rollout.max_model_len if config.rollout.engine == "vllm" else None
    prompts, records = fit_prompts(prompts, records, limit=context_of(student, config.train.max_seq_len, vllm_limit),
                                   new_tokens=config.rollout.max_new_tokens, what=f"data.source {config.data.source}",
                                   on_bad_row=config.data.on_bad_row)
    check_benchmark_prompts(student, config.eval, vllm_limit)
    return Prepared(records, prompts, student, teacher, base)


def load_models(config):
    """Student, teacher and (where the objective needs it) the frozen base, checked to share the vocabulary.
    A teacher scored by vLLM (in-process or a server) is not loaded here, only checked; the models that
    rollout=vllm samples from are checked to run on vLLM here."""
    spec = OBJECTIVES[config.objective.name]
    student = load_policy(config.student, role="student", seed=config.seed, trainable=True,
                          activation_checkpointing=config.train.activation_checkpointing)
    top_k, vocabulary = getattr(config.objective, "top_k", None), vocabulary_of(student)
    if top_k is not None and top_k > vocabulary:
        raise ConfigError(f"objective.top_k={top_k}: more than the student's vocabulary of {vocabulary:,} tokens")
    teacher = None
    if config.teacher.engine == "hf" or spec.samples_from == "teacher":
        teacher = load_policy(config.teacher, role="teacher", device=student.device)
        check_compatible(student, teacher, "teacher")
    if config.teacher.engine != "hf" and spec.teacher_scores:
        check_teacher(config.teacher, student, config.objective.top_k)
    if config.rollout.engine == "vllm":
        from aopd_cli.rollout.vllm import check_rollout_model

        check_rollout_model(student if spec.samples_from == "student" else teacher, spec.samples_from)
    base = None
    if spec.frozen_base:
        base = load_policy(config.base or config.student, role="base", device=student.device, seed=config.seed)
        check_compatible(student, base, "base")
    return student, teacher, base


@dataclass
class Engines:
    """What a stage samples, evaluates and scores with, alive from its first evaluation to its last."""

    rollout: Rollout  # the objective's sampler (the student; the teacher for seqkd)
    evaluation: Rollout  # the student, for the Pass@k curve and the evaluations around the loop
    score: object | None  # the teacher's scorer (None: the objective needs no teacher scores)


@contextmanager
def stage_engines(config, prepared: Prepared, log_dir: Path):
    """The stage's engines, started before its first evaluation and closed together at its end: under vLLM
    0.33 closing any in-process engine tears down the model-parallel groups every engine of the process
    runs on, so none may be used after another one closed (the teacher's vLLM engine used to close
    before the closing evaluation on the rollout engine). With rollout=vllm evaluations run on the rollout
    engine when it holds the student (it is synced after every update); SeqKD's teacher samples on an
    engine of its own, and its evaluations then run on a student engine, never both alive at once
    (`one_at_a_time`: each evaluation closes the teacher's engine and the next step starts it again).
    With rollout=hf they use HF generate."""
    spec, rollout_cfg, objective = OBJECTIVES[config.objective.name], config.rollout, config.objective
    student, teacher = prepared.student, prepared.teacher
    sampler = student if spec.samples_from == "student" else teacher
    with ExitStack() as stack:
        if rollout_cfg.engine == "vllm" and sampler is student:
            rollout = evaluation = make_rollout("vllm", student, rollout_cfg)
            stack.callback(rollout.close)
        elif rollout_cfg.engine == "vllm":
            rollout, evaluation = one_at_a_time(
                lambda: make_rollout("vllm", teacher, rollout_cfg, frozen=True),
                lambda: make_rollout("vllm", student, rollout_cfg, config.eval.batch_size))
            stack.callback(rollout.close)
            stack.callback(evaluation.close)
            synced = evaluation

            def generate(*args, **kwargs):  # an engine still alive from the last evaluation has its weights
                synced.sync_weights()
                return synced.generate(*args, **kwargs)

            evaluation = Rollout(generate, evaluation.sync_weights, evaluation.close)
        else:
            rollout = make_rollout("hf", sampler, rollout_cfg)
            evaluation = make_rollout("hf", student, rollout_cfg, config.eval.batch_size)
        score = None
        if spec.teacher_scores and config.teacher.engine == "hf":
            score = hf_scorer(teacher, objective.top_k)
        elif spec.teacher_scores:  # an engine or a server, for the stage and no longer
            score = stack.enter_context(teacher_scorer(config.teacher, teacher, student, objective.top_k, log_dir))
        yield Engines(rollout, evaluation, score)


def rollout_micro_batches(batch: RolloutBatch, size: int, token_budget: int | None = None) -> list[MicroBatch]:
    """Prompt + response sequences cut into micro-batches; targets are the response tokens."""
    ids_BL = torch.cat([batch.prompt_ids_BP, batch.response_ids_BR], dim=1)
    attn_BL = torch.cat([batch.prompt_mask_BP.long(), batch.response_mask_BR.long()], dim=1)
    return micro_batches(ids_BL, attn_BL, batch.prompt_ids_BP.shape[1], batch.response_mask_BR, size, token_budget)


def _reference_batch(policy, prompts, references) -> RolloutBatch:
    """GKD's off-policy half: the dataset's reference responses in the rollout layout."""
    prompt_ids, prompt_mask = left_pad(prompts, policy.tokenizer.pad_token_id)
    end = policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    suffix = [end] if end in policy.stop_ids else [policy.tokenizer.eos_token_id]
    responses = [policy.tokenizer(text, add_special_tokens=False)["input_ids"] + suffix for text in references]
    response_ids, valid = right_pad(responses, policy.tokenizer.pad_token_id)
    return RolloutBatch(prompt_ids, prompt_mask, response_ids, mask_through_first_stop(response_ids, policy.stop_ids,
                                                                                         valid), list(range(len(prompts))))


def onpolicy_loop(config, session, prepared: Prepared, engines: Engines, *, evaluate=None
                  ) -> tuple[Path, torch.Tensor]:
    """Run the stage's optimizer steps; returns the final checkpoint and a sample of the advantages seen.
    Each rank rolls out, scores and grades its share of a step's prompts."""
    objective, train, rollout_cfg = config.objective, config.train, config.rollout
    rollout, score = engines.rollout, engines.score
    records, prompts, student, base = prepared.records, prepared.prompts, prepared.student, prepared.base
    log_dataset(session, "train", config.data.source, records)
    spec = OBJECTIVES[objective.name]
    remote = spec.teacher_scores and config.teacher.engine != "hf"  # an engine that batches a whole step itself
    served = spec.teacher_scores and config.teacher.engine == "server"  # in another process: requested ahead
    overlap = served and _overlaps(config.teacher, student)
    score_base = hf_scorer(base, 1) if spec.frozen_base else None
    rng = random.Random(config.seed)
    diagnostics = {"advantages": []}  # a sample of the advantages seen (saved with each step checkpoint)
    base_loss = objective_loss(objective)
    # this step's recorder (`drift_recorder`): the loss, and the advantages and engine gaps it keeps
    current = {"step": None, "loss": base_loss, "read": None}

    def make_step(step: int) -> StepBatch:
        timings: dict[str, float] = {}
        with names.timed("rollout", timings):
            everyone = sample_indices(rng, len(records), train.batch_size)
            share = dist.shard_range(len(everyone))
            chosen = everyone[share.start:share.stop]
            if spec.references and rng.random() >= objective.lmbda:
                batch = _reference_batch(student, [prompts[i] for i in chosen],
                                         [records[i].get("reference") or "" for i in chosen])
            else:  # per-prompt seeds from the step's seed and the prompt's place in the step: any world size
                batch = rollout.generate([prompts[i] for i in chosen], n=rollout_cfg.n,
                                         temperature=rollout_cfg.temperature, max_new_tokens=rollout_cfg.max_new_tokens,
                                         seed=config.seed * 100003 + step, indices=list(share))
        micro_batches = rollout_micro_batches(batch, train.micro_batch_size, train.micro_batch_tokens)
        keep = sum(a.numel() for a in diagnostics["advantages"]) < ADVANTAGE_SAMPLE
        current["loss"], current["read"] = drift_recorder(
            base_loss, batch.logprobs_BR if spec.samples_from == "student" else None, keep_advantages=keep)
        current["step"] = step
        metrics = {}
        with names.timed("teacher", timings):
            if served:  # requests go out now, one a micro-batch; the update waits for each as it comes to it
                _score_ahead(score, micro_batches, pool, metrics)
            elif remote:
                score_rows(score, micro_batches, rollout_micro_batches(batch, len(batch.prompt_index_B))[0])
            # a sharded scorer needs the same number of forwards on every rank: extra ones are thrown away
            rounds = int(dist.all_reduce([len(micro_batches)], "max")[0])
            for index in range(rounds):
                micro = micro_batches[min(index, len(micro_batches) - 1)]
                teacher_scores = score(micro) if score is not None and not remote else None
                base_scores = score_base(micro) if score_base is not None else None
                if index < len(micro_batches):
                    micro.teacher = micro.teacher if remote else teacher_scores
                    micro.base_logprobs_BT = base_scores.token_logprobs if base_scores is not None else None
            if spec.grades(objective):
                correct = _grade(student, batch, [records[chosen[i]] for i in batch.prompt_index_B])
                for micro in micro_batches:
                    micro.correct_B = correct[micro.rows_B]
        # one dict, which the served scores' waits still write into during the update (the loop reads it after)
        metrics |= {**timings, names.train("response_len"): float(batch.response_mask_BR.sum(-1).float().mean())}
        if served and not overlap:  # scored while the step graded, then awaited before the update starts
            for micro in micro_batches:
                micro.ready()
        return StepBatch(micro_batches, global_normalizer(batch.response_mask_BR, objective.reduction), metrics)

    def after_update():
        advantages_N, gaps_N = current["read"]() if current["read"] else (None, None)
        current["read"] = None
        if advantages_N is not None:
            diagnostics["advantages"].append(advantages_N)
        # a frozen teacher's engine has nothing to sync after a student update
        if spec.samples_from != "student":
            return
        timings: dict[str, float] = {}
        with names.timed("sync", timings):
            rollout.sync_weights()
        if gaps_N is None or rollout_cfg.engine == "hf":  # resuming; or nothing to sync or compare
            return
        largest = dist.all_reduce([float(gaps_N.max()) if gaps_N.numel() else 0.0], "max")[0]
        total, count = dist.all_reduce([float(gaps_N.sum()), gaps_N.numel()])
        if count:  # not on a step of reference responses (gkd's lmbda < 1): nothing was sampled
            timings |= {names.rollout("logprob_diff_max"): largest, names.rollout("logprob_diff_mean"): total / count}
        session.tracker.log_metrics(timings, step=current["step"] + 1)

    with ThreadPoolExecutor(config.teacher.max_in_flight) as pool:  # make_step reads it
        checkpoint = train_loop(session, student, make_step=make_step, sampler=rng,
                                loss_fn=lambda head, micro, normalizer: current["loss"](head, micro, normalizer),
                                after_update=after_update, evaluate=evaluate, label=session.name,
                                diagnostics=diagnostics)
    advantages = diagnostics["advantages"]
    return checkpoint, torch.cat(advantages) if advantages else torch.zeros(0)


def drift_recorder(base_loss, engine_logprobs_BR: torch.Tensor | None, *, keep_advantages: bool = True):
    """(loss_fn, read) for one step. `loss_fn` computes the objective and keeps, on the device, the step's
    advantages and how far the trainer's log-prob of each sampled token is from the engine's that sampled
    it (`engine_logprobs_BR`, on the host; None: nothing to compare). `read()`, once the step is over, gives
    both on the host (advantages [N] or None, gaps [M] or None): the step's one read-back of them, not a
    wait on the device a micro-batch."""
    advantages, gaps = [], []

    def loss_fn(head, micro, normalizer):
        output = base_loss(head, micro, normalizer)
        if output.advantages is not None and keep_advantages:
            advantages.append(output.advantages.detach().float())
        if engine_logprobs_BR is not None and output.token_logprobs is not None:  # the sampling weights
            width = micro.mask_BT.shape[1]
            engine_BT = engine_logprobs_BR[micro.rows_B, :width].to(micro.mask_BT.device, non_blocking=True)
            gaps.append((output.token_logprobs.float() - flat(engine_BT, output.counted_N)).abs())
        return output

    def read():
        parts = [torch.cat(advantages)] if advantages else []
        parts += [torch.cat(gaps)] if gaps else []
        together = torch.cat(parts).cpu() if parts else torch.zeros(0)
        advantages_N = together[:parts[0].numel()] if advantages else None
        return advantages_N, together[len(together) - parts[-1].numel():] if gaps else None

    return loss_fn, read


def _overlaps(teacher_cfg, student) -> bool:
    """Whether the update's forward runs while a served teacher scores (`teacher.overlap`). By default not
    when the trainer is on the CPU and the teacher on this machine: the two then share the same cores, and on
    2 of them the lab's step took 1.29x the HF teacher's step overlapped, 0.94x waiting (benchmarks/results.md)."""
    if teacher_cfg.overlap is not None:
        return teacher_cfg.overlap
    from urllib.parse import urlparse

    host = urlparse(teacher_cfg.url).hostname if teacher_cfg.url else "127.0.0.1"  # or one aopd starts here
    return student.device.type != "cpu" or host not in ("127.0.0.1", "localhost", "::1")


def _score_ahead(score, micro_batches: list, pool, metrics: dict) -> None:
    """Every micro-batch's scoring sent off at once; each micro-batch waits for its own scores when the
    update has run its forward, or all before the update without overlap (`_overlaps`). The helper threads
    only wait on the network; the tensors are made here, see `served_scorer`. `time/teacher_s` is then the
    scoring's wall time (first request to last answer), `time/teacher_wait_s` how much of it the trainer spent
    blocked, up to each answer's arrival: the waits are disjoint parts of that wall time, so never more than it.
    Making the tensors is the trainer's own work and counts in neither (a thread handing an answer over late
    on a loaded machine is not scoring)."""
    started, finished = time.perf_counter(), []

    def fetched(micro):
        answers = score.fetch(micro)
        finished.append(time.perf_counter())  # before the future is done: read only after waiting on it
        return answers, finished[-1]

    metrics[names.seconds("teacher_wait")] = 0.0
    for micro in micro_batches:
        future = pool.submit(fetched, micro)

        def ready(micro=micro, future=future):
            if micro.teacher is None:
                waiting = time.perf_counter()
                answers, answered = future.result()
                metrics[names.seconds("teacher_wait")] += max(0.0, answered - waiting)
                metrics[names.seconds("teacher")] = max(finished) - started
                micro.teacher = score.finish(micro, answers)
            return micro.teacher

        micro.ready = ready


def _grade(policy, batch: RolloutBatch, records: list[dict]) -> torch.Tensor:
    """Per response: correct? Math prompts by their answer (a response without `\\boxed{}` is wrong, as
    method.md's "trajectories with incorrect final answers" asks), a tool turn by the call it should make
    (or, last, by answering without a call)."""
    texts = [policy.tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
             for ids, mask in zip(batch.response_ids_BR, batch.response_mask_BR)]
    return torch.tensor([grade_math(text, record["answer"], require_boxed=True) if "answer" in record
                         else grade_turn(text, record["expected"]) for text, record in zip(texts, records)],
                        dtype=torch.bool)


def log_advantages(tracker, advantages: torch.Tensor, out_dir: Path, objective: str) -> None:
    """The sample of advantages seen in training: raw (for `aopd compare`) and as a histogram PNG."""
    import numpy as np

    from aopd_cli.results.plots import advantage_histogram

    np.save(out_dir / "advantages.npy", advantages.numpy())
    tracker.log_artifact(out_dir / "advantages.npy")
    tracker.log_artifact(advantage_histogram({objective: advantages.numpy()}, out_dir / "advantages.png",
                                             f"Advantages seen in training ({objective})"))
