"""`aopd distill`: on-policy distillation. Each step samples `train.batch_size` prompts, rolls out the
current student (the teacher for seqkd; reference responses with probability 1 - lmbda for gkd), scores
the sequences with the teacher (and the frozen base for exopd), computes the objective over
micro-batches with the whole batch's normaliser, steps the optimizer, syncs the rollout weights and logs.

    aopd distill objective=opd train.steps=10
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from aopd_cli.data.loaders import load_data
from aopd_cli.data.prompts import chat_ids, math_messages, tool_messages
from aopd_cli.engine import check_compatible, load_policy, seed_everything
from aopd_cli.errors import UserError
from aopd_cli.eval import grade_math
from aopd_cli.objectives import aopd_loss, exopd_loss, global_normalizer, gkd_loss, opd_loss, seqkd_loss
from aopd_cli.rollout import RolloutBatch, left_pad, make_rollout, mask_through_first_stop, right_pad
from aopd_cli.stages.common import StepBatch, rollout_micro_batches, sample_indices, tracked_run, train_loop
from aopd_cli.stages.evaluate import evaluate_policy, print_metrics
from aopd_cli.teacher import hf_scorer


def objective_loss(objective):
    """(head, micro, normalizer) -> ObjectiveOutput for the configured objective."""
    def loss(head, micro, normalizer):
        device = head.hidden.device
        teacher = micro.teacher
        if teacher is not None:
            teacher = type(teacher)(*(t.to(device) for t in (teacher.token_logprobs, teacher.topk_ids,
                                                             teacher.topk_logprobs)))
        common = dict(reduction=objective.reduction, normalizer=normalizer)
        tokens, mask = micro.targets_BT.to(device), micro.mask_BT.to(device)
        if objective.name == "aopd":
            correct = micro.correct_B.to(device) if micro.correct_B is not None else None
            return aopd_loss(head, tokens, mask, teacher, tau=objective.tau, beta=objective.beta,
                             intervention=objective.intervention, zero_eps=objective.zero_eps, correct=correct,
                             support=objective.support, **common)
        if objective.name == "opd":
            return opd_loss(head, tokens, mask, teacher, **common)
        if objective.name == "gkd":
            return gkd_loss(head, tokens, mask, teacher, beta=objective.beta, support=objective.support, **common)
        if objective.name == "exopd":
            return exopd_loss(head, tokens, mask, teacher, base_logprobs=micro.base_logprobs_BT.to(device),
                              lam=objective.lam, **common)
        return seqkd_loss(head, tokens, mask, **common)
    return loss


def _reference_batch(policy, prompts, references) -> RolloutBatch:
    """GKD's off-policy half: the dataset's reference responses in the rollout layout."""
    prompt_ids, prompt_mask = left_pad(prompts, policy.tokenizer.pad_token_id)
    end = policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    suffix = [end] if end in policy.stop_ids else [policy.tokenizer.eos_token_id]
    responses = [policy.tokenizer(text, add_special_tokens=False)["input_ids"] + suffix for text in references]
    response_ids, valid = right_pad(responses, policy.tokenizer.pad_token_id)
    return RolloutBatch(prompt_ids, prompt_mask, response_ids, mask_through_first_stop(response_ids, policy.stop_ids,
                                                                                         valid), list(range(len(prompts))))


def prepare(config):
    """Seeds, the prompts (math for distill, tools for continual) and the models, checked before any run
    or work starts: a missing dataset or checkpoint, or a teacher with another vocabulary, stops here."""
    seed_everything(config.seed)
    records = load_data(config.data, "prompts" if config.stage == "distill" else "tool_train")
    if config.objective.name == "gkd" and config.objective.lmbda < 1 and not all(r.get("reference") for r in records):
        raise UserError(f"objective.lmbda={config.objective.lmbda} mixes in the dataset's reference responses, but "
                        f"data {config.data.source!r} has none for some prompts (DeepMath's r1_solution_1 gives them); "
                        "use objective.lmbda=1")
    return (records, *load_models(config))


def load_models(config):
    """Student, teacher and (exopd) base, checked to share the vocabulary."""
    student = load_policy(config.student, role="student", seed=config.seed)
    teacher = load_policy(config.teacher, role="teacher", device=student.device)
    check_compatible(student, teacher, "teacher")
    teacher.model.requires_grad_(False)
    base = None
    if config.objective.name == "exopd":
        base = load_policy(config.base or config.student, role="base", device=student.device, seed=config.seed)
        check_compatible(student, base, "base")
        base.model.requires_grad_(False)
    return student, teacher, base


def distill_loop(config, tracker, records, student, teacher, base, *, evaluate=None) -> tuple[Path, torch.Tensor]:
    """The shared rollout-score-update loop of `distill` and `continual`; returns the final checkpoint
    and a sample of the advantages seen (for the histogram)."""
    objective, train, rollout_cfg = config.objective, config.train, config.rollout
    is_math = config.stage == "distill"
    prompts = [chat_ids(student.tokenizer, math_messages(r["problem"], config.data.prompt_suffix) if is_math
                        else tool_messages(r, config.data.prompt_style), add_generation_prompt=True) for r in records]
    rollout = make_rollout(rollout_cfg.engine, student if objective.name != "seqkd" else teacher, rollout_cfg)
    score = hf_scorer(teacher, getattr(objective, "top_k", 1))
    score_base = hf_scorer(base, 1) if base is not None else None
    rng, advantages = random.Random(config.seed), []

    def make_step(step: int) -> StepBatch:
        started = time.perf_counter()
        chosen = sample_indices(rng, len(records), train.batch_size)
        use_reference = objective.name == "gkd" and rng.random() >= objective.lmbda
        if use_reference:
            batch = _reference_batch(student, [prompts[i] for i in chosen],
                                     [records[i].get("reference") or "" for i in chosen])
        else:
            batch = rollout.generate([prompts[i] for i in chosen], n=rollout_cfg.n, temperature=rollout_cfg.temperature,
                                     max_new_tokens=rollout_cfg.max_new_tokens, seed=config.seed * 100003 + step)
        scored = time.perf_counter()
        micro_batches = rollout_micro_batches(batch, train.micro_batch_size)
        for micro in micro_batches:
            if objective.name != "seqkd":
                micro.teacher = score(micro)
            if score_base is not None:
                micro.base_logprobs_BT = score_base(micro).token_logprobs
        if getattr(objective, "intervention", None) == "accuracy":
            correct = _grade(student, batch, [records[chosen[i]]["answer"] for i in batch.prompt_index_B])
            for start, micro in zip(range(0, len(correct), train.micro_batch_size), micro_batches):
                micro.correct_B = correct[start:start + micro.ids_BL.shape[0]]
        done = time.perf_counter()
        return StepBatch(micro_batches, global_normalizer(batch.response_mask_BR, objective.reduction), {
            "time/rollout_s": scored - started, "time/teacher_s": done - scored,
            "train/response_len": float(batch.response_mask_BR.sum(-1).float().mean())})

    base_loss = objective_loss(objective)

    def loss_fn(head, micro, normalizer):
        output = base_loss(head, micro, normalizer)
        if output.advantages is not None and sum(a.numel() for a in advantages) < 200_000:
            advantages.append(output.advantages.detach().float().cpu())
        return output

    # seqkd samples from the frozen teacher: its engine has nothing to sync after a student update
    sync = rollout.sync_weights if objective.name != "seqkd" else (lambda: None)
    checkpoint = train_loop(config, student, tracker, make_step=make_step, loss_fn=loss_fn,
                            after_update=sync, evaluate=evaluate, label=config.stage)
    return checkpoint, torch.cat(advantages) if advantages else torch.zeros(0)


def _grade(policy, batch: RolloutBatch, answers: list[str]) -> torch.Tensor:
    texts = [policy.tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
             for ids, mask in zip(batch.response_ids_BR, batch.response_mask_BR)]
    return torch.tensor([grade_math(text, answer) for text, answer in zip(texts, answers)], dtype=torch.bool)


def log_advantages(tracker, advantages: torch.Tensor, out_dir: Path, objective: str) -> None:
    """The sample of advantages seen in training: raw (for `aopd compare`) and as a histogram PNG."""
    import numpy as np

    np.save(out_dir / "advantages.npy", advantages.numpy())
    tracker.log_artifact(out_dir / "advantages.npy")
    tracker.log_artifact(save_histogram(advantages, out_dir / "advantages.png",
                                        f"Advantages seen in training ({objective})"))


def save_histogram(advantages: torch.Tensor, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(advantages.clamp(-10, 10).numpy(), bins=80, color="#4477aa")
    ax.axvline(0, color="black", lw=0.8)
    ax.set(title=title, xlabel="advantage A_t = log P_T(y_t) - log P_S(y_t) (clipped to ±10)", ylabel="tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_distill(config, *, parent_run_id: str | None = None, run_name: str | None = None,
                tags: dict[str, str] | None = None) -> Path:
    records, student, teacher, base = prepare(config)
    with tracked_run(config, run_name=run_name, parent_run_id=parent_run_id, tags=tags) as tracker:
        eval_rollout = make_rollout("hf", student, None, config.eval.batch_size)

        def evaluate(step: int) -> dict[str, float]:
            return evaluate_policy(student, eval_rollout, config.eval, seed=config.seed + step, tools=False)[0]

        if config.train.eval_every and config.eval.benchmarks:
            tracker.log_metrics(evaluate(0), step=0)  # the curve starts at the warm-up checkpoint
        checkpoint, advantages = distill_loop(config, tracker, records, student, teacher, base, evaluate=evaluate)
        metrics = evaluate_policy(student, eval_rollout, config.eval, seed=config.seed + config.train.steps)[0]
        tracker.log_metrics(metrics, step=config.train.steps)
        print_metrics(f"distill {run_name or config.objective.name}", metrics, config.eval)
        log_advantages(tracker, advantages, Path(config.output_dir), config.objective.name)
        return checkpoint
