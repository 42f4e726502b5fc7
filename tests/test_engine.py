"""Engine pieces: checkpoints, compatibility checks, rollout masks, the teacher scorer, accumulation."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from aopd_cli.config.schema import LabArch, ModelConfig, TrainConfig
from aopd_cli.errors import UserError
from aopd_cli.rollout.engines import make_rollout
from aopd_cli.rollout.interface import mask_through_first_stop
from aopd_cli.teacher.scorers import hf_scorer
from aopd_cli.training.checkpoints import load_training_state
from aopd_cli.training.checkpoints import save_final as save_checkpoint
from aopd_cli.training.models import check_compatible, load_policy
from aopd_cli.training.objectives import global_normalizer, seqkd_loss
from aopd_cli.training.update import MicroBatch, make_optimizer, update

TINY = ModelConfig(arch=LabArch(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                                intermediate_size=64))


@pytest.fixture
def policy(lab_cache):
    return load_policy(TINY, role="student", device=torch.device("cpu"), seed=0)


def test_checkpoint_round_trips_weights_tokenizer_and_state(policy, tmp_path):
    optimizer, scheduler = make_optimizer(policy.model, TrainConfig(steps=3, lr=1e-3))
    path = save_checkpoint(policy, tmp_path / "ckpt", config_yaml="stage: warmup\n", optimizer=optimizer,
                           scheduler=scheduler, step=7)
    loaded = load_policy(ModelConfig(path=str(path)), role="student", device=torch.device("cpu"))
    for (name, a), (_, b) in zip(policy.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.tokenizer.get_vocab() == policy.tokenizer.get_vocab() and loaded.stop_ids == policy.stop_ids
    state = load_training_state(path)
    assert state["step"] == 7 and "optimizer" in state and (path / "aopd_config.yaml").read_text() == "stage: warmup\n"
    assert (path / "model.safetensors").is_file()


def test_a_final_checkpoint_is_in_the_dtype_the_student_was_loaded_in(policy, tmp_path):
    import dataclasses
    import json

    from safetensors.torch import load_file

    trained_in_bf16 = dataclasses.replace(policy, compute_dtype=torch.bfloat16)  # fp32 masters, bf16 compute
    path = save_checkpoint(trained_in_bf16, tmp_path / "bf16", config_yaml="stage: distill\n")
    weights = load_file(str(path / "model.safetensors"))
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    masters = policy.model.state_dict()
    assert all(torch.equal(weights[name], masters[name].to(torch.bfloat16)) for name in weights)
    assert next(policy.model.parameters()).dtype == torch.float32  # the trainer keeps its fp32 masters


def test_a_killed_save_never_leaves_a_partial_checkpoint_in_place(policy, tmp_path, lab_cache):
    target = tmp_path / "ckpt"
    save_checkpoint(policy, target, config_yaml="first\n", step=1)
    script = textwrap.dedent(f"""
        import os, torch
        from aopd_cli.config.schema import ModelConfig
        from aopd_cli.training.checkpoints import save_final as save_checkpoint
        from aopd_cli.training.models import load_policy
        policy = load_policy(ModelConfig(path={str(target)!r}), role="student", device=torch.device("cpu"))
        torch.save = lambda *a, **k: os.kill(os.getpid(), 9)  # die in the middle of writing
        save_checkpoint(policy, {str(target)!r}, config_yaml="second\\n", step=2)
    """)
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ, "AOPD_CACHE": str(lab_cache)})
    assert result.returncode == -9
    assert (target / "aopd_config.yaml").read_text() == "first\n"  # the old checkpoint, whole
    assert load_training_state(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["ckpt"]


def test_missing_checkpoint_and_mismatched_vocabulary_are_refused(policy, tmp_path):
    with pytest.raises(UserError, match="student.path: no checkpoint"):
        load_policy(ModelConfig(path=str(tmp_path / "none")), role="student")
    other = load_policy(TINY, role="teacher", device=torch.device("cpu"))
    other.tokenizer.add_tokens(["<extra>"])
    other.model.resize_token_embeddings(len(other.tokenizer))
    size = len(policy.tokenizer)
    with pytest.raises(UserError, match=rf"teacher cannot score.*output vocabulary {size + 1} vs the student's {size}"):
        check_compatible(policy, other, "teacher")


def test_response_mask_ends_at_the_first_stop_token():
    ids = torch.tensor([[5, 6, 2, 7, 2], [2, 5, 5, 5, 5], [5, 5, 5, 5, 5]])
    mask = mask_through_first_stop(ids, {2})
    assert mask.tolist() == [[True, True, True, False, False], [True, False, False, False, False], [True] * 5]


def test_rollouts_sample_n_per_prompt_and_stop(policy):
    rollout = make_rollout("hf", policy, None)
    batch = rollout.generate([[1, 20, 21], [1, 22]], n=3, temperature=1.0, max_new_tokens=5, seed=0)
    assert batch.prompt_index_B == [0, 0, 0, 1, 1, 1] and batch.response_ids_BR.shape[0] == 6
    again = rollout.generate([[1, 20, 21], [1, 22]], n=3, temperature=1.0, max_new_tokens=5, seed=0)
    assert torch.equal(batch.response_ids_BR, again.response_ids_BR)  # seeded sampling is reproducible
    for ids, mask in zip(batch.response_ids_BR, batch.response_mask_BR):
        stops = [i for i, t in enumerate(ids.tolist()) if t in policy.stop_ids]
        assert mask.sum() == (stops[0] + 1 if stops else mask.shape[0] if mask.all() else mask.sum())


def test_teacher_scorer_returns_full_vocabulary_topk_and_token_logprobs(policy):
    ids = torch.tensor([[0, 1, 30, 31, 32, 33]])
    micro = MicroBatch(ids, torch.tensor([[0, 1, 1, 1, 1, 1]]), 3, torch.ones(1, 3, dtype=torch.bool))
    scored = hf_scorer(policy, 4, chunk_size=2)(micro)  # chunks smaller than the 3 positions
    position_ids = torch.tensor([[0, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        logp = torch.log_softmax(policy.model(ids, attention_mask=micro.attn_BL, position_ids=position_ids).logits, -1)
    expected = logp[:, 2:5]
    assert torch.allclose(scored.token_logprobs, expected.gather(-1, ids[:, 3:, None])[..., 0], atol=1e-5)
    assert torch.allclose(scored.topk_logprobs, expected.topk(4, -1).values, atol=1e-5)


def grad_recording(optimizer, model) -> list:
    """The gradients each step of `optimizer` sees (`update` frees them once the step is taken)."""
    seen = []
    optimizer.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in model.parameters()]))
    return seen


def test_accumulation_gives_the_same_step_for_any_micro_batch_size(lab_cache):
    results = []
    for micro_size in (2, 5):
        policy = load_policy(TINY, role="student", device=torch.device("cpu"), seed=0, trainable=True)
        # lr 0: the step leaves the weights alone, so the accumulated gradients themselves are compared
        optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.0)
        seen = grad_recording(optimizer, policy.model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 90, (5, 9), generator=gen)
        mask = torch.rand(5, 8, generator=gen) > 0.3
        attn = torch.ones_like(ids)
        micro = [MicroBatch(ids[s:s + micro_size], attn[s:s + micro_size], 1, mask[s:s + micro_size])
                 for s in range(0, 5, micro_size)]
        result = update(policy, optimizer, scheduler, micro,
                        lambda head, m, norm: seqkd_loss(head, m.targets_BT, m.mask_BT, normalizer=norm),
                        global_normalizer(mask, "seq-mean-token-mean"), grad_clip=100.0)
        loss, grad_norm = result.loss, result.grad_norm
        results.append((loss, grad_norm, seen[-1]))
        assert all(p.grad is None for p in policy.model.parameters())  # freed once the step is taken
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
    for small, large in zip(results[0][2], results[1][2]):
        assert torch.allclose(small, large, rtol=1e-4, atol=1e-7)


def test_the_forward_runs_before_a_served_teachers_scores_are_awaited(lab_cache):
    """The update overlaps a served teacher: each micro-batch's forward runs first, then its scores are
    awaited (`ready`), and the loss sees them."""
    from aopd_cli.training.objectives import TeacherTopK

    policy = load_policy(TINY, role="student", device=torch.device("cpu"), seed=0, trainable=True)
    optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    forwards, events = [], []
    policy.model.register_forward_hook(lambda *_: forwards.append(1))
    ids = torch.randint(3, 90, (4, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.bool)
    micros = []
    for row in (0, 2):
        scores = TeacherTopK(torch.zeros(2, 8), torch.zeros(2, 8, 3, dtype=torch.long), torch.zeros(2, 8, 3))
        micro = MicroBatch(ids[row:row + 2], torch.ones(2, 9, dtype=torch.long), 1, mask)
        micro.ready = lambda row=row, scores=scores: events.append(("awaited", row, len(forwards))) or scores
        micros.append((micro, scores))

    def loss_fn(head, micro, norm):
        events.append(("loss", micro.teacher))
        return seqkd_loss(head, micro.targets_BT, micro.mask_BT, normalizer=norm)

    update(policy, optimizer, scheduler, [micro for micro, _ in micros], loss_fn, 16, grad_clip=100.0)
    assert events == [("awaited", 0, 1), ("loss", micros[0][1]), ("awaited", 2, 2), ("loss", micros[1][1])]


def test_activation_checkpointing_gives_the_same_gradients(lab_cache):
    grads = []
    for checkpointing in (False, True):
        policy = load_policy(TINY, role="student", device=torch.device("cpu"), seed=0, trainable=True,
                             activation_checkpointing=checkpointing)
        optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.0)
        seen = grad_recording(optimizer, policy.model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 90, (4, 9), generator=gen)
        mask = torch.rand(4, 8, generator=gen) > 0.3
        micro = [MicroBatch(ids, torch.ones_like(ids), 1, mask)]
        update(policy, optimizer, scheduler, micro,
               lambda head, m, norm: seqkd_loss(head, m.targets_BT, m.mask_BT, normalizer=norm),
               global_normalizer(mask, "seq-mean-token-mean"), grad_clip=100.0)
        grads.append(seen[-1])
    for plain, recomputed in zip(*grads):
        assert torch.allclose(plain, recomputed, atol=1e-6)


def test_long_examples_are_truncated_or_dropped_and_counted():
    from aopd_cli.stages.warmup import fit_length

    examples = [([1] * 5, [True] * 5), ([1] * 12, [True] * 12)]
    kept, count = fit_length(examples, 8, "truncate")
    assert count == 1 and [len(ids) for ids, _ in kept] == [5, 8]
    kept, count = fit_length(examples, 8, "drop")
    assert count == 1 and [len(ids) for ids, _ in kept] == [5]


def test_token_budget_micro_batches_group_similar_lengths_and_trim_padding():
    from aopd_cli.training.batches import micro_batches

    lengths = [3, 9, 4, 8]
    ids = torch.zeros(4, 10, dtype=torch.long)
    attn = torch.zeros(4, 10, dtype=torch.long)
    for row, length in enumerate(lengths):
        attn[row, :length] = 1
    mask = attn[:, 1:].bool()
    cut = micro_batches(ids, attn, 1, mask, size=8, token_budget=20)
    assert [m.rows_B.tolist() for m in cut] == [[0, 2], [3, 1]]  # short with short, long with long
    assert [m.ids_BL.shape[1] for m in cut] == [4, 9]  # each trimmed to its own longest row
    assert sum(int(m.mask_BT.sum()) for m in cut) == int(mask.sum())


def test_a_stage_takes_the_threads_it_is_given(tmp_path, lab_cache):
    from aopd_cli.config.compose import load_stage_config
    from aopd_cli.stages.runner import run_stage

    before = torch.get_num_threads()
    try:
        config = load_stage_config("eval", ["student=lab_student", "eval.limit=1", "eval.n=1", "eval.k=[1]",
                                            "eval.max_new_tokens=4", "eval.tool_benchmarks=[]", "threads=1",
                                            "tracking.enabled=false", f"output_dir={tmp_path / 'ev'}"])
        run_stage(config)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
