"""GPU-only checks (marker `gpu`, deselected by default): bf16 on CUDA, memory at real vocabulary size,
and a lab distillation on the GPU. Run with `python -m pytest -m gpu -s tests/test_gpu.py`."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _case(tokens, vocab, hidden, top_k, dtype):
    from aopd_cli.training.objectives import TeacherTopK

    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden_BTH = (torch.randn(1, tokens, hidden, device="cuda", generator=gen) / hidden**0.5).to(dtype)
    weight_VH = (torch.randn(vocab, hidden, device="cuda", generator=gen) * 0.5).to(dtype)
    tokens_BT = torch.randint(0, vocab, (1, tokens), device="cuda", generator=gen)
    teacher_logp = torch.log_softmax(torch.randn(1, tokens, top_k + 1, device="cuda", generator=gen), -1) - 3
    teacher = TeacherTopK(teacher_logp[..., 0], torch.randint(0, vocab, (1, tokens, top_k), device="cuda",
                                                              generator=gen), teacher_logp[..., :top_k])
    return hidden_BTH, weight_VH, tokens_BT, torch.ones(1, tokens, dtype=torch.bool, device="cuda"), teacher


def test_lmhead_matches_logits_path_in_bf16_on_cuda():
    from aopd_cli.training.objectives import LMHead, aopd_loss

    h, w, tok, mask, teacher = _case(2048, 32768, 512, 32, torch.bfloat16)
    h1, w1 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = aopd_loss(h1 @ w1.T, tok, mask, teacher)
    ref.loss.backward()
    h2, w2 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = aopd_loss(LMHead(h2, w2, chunk_size=512), tok, mask, teacher)
    out.loss.backward()
    assert torch.allclose(out.loss, ref.loss, rtol=1e-3)
    assert torch.allclose(h2.grad.float(), h1.grad.float(), rtol=2e-2, atol=1e-4)
    assert torch.allclose(w2.grad.float(), w1.grad.float(), rtol=2e-2, atol=1e-4)


def _measure(student_of, h, w, tok, mask, teacher):
    import time

    from aopd_cli.training.objectives import aopd_loss

    for _ in range(2):  # the second run is measured (the first pays allocator and kernel warm-up)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        started = time.perf_counter()
        aopd_loss(student_of(h, w), tok, mask, teacher).loss.backward()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        h.grad = w.grad = None
    return elapsed, peak


def test_lmhead_memory_and_time_at_qwen3_vocabulary():
    """8,192 tokens, V = 151,936, H = 4,096 (Qwen3-8B's head), bf16: time and peak memory, printed."""
    from aopd_cli.training.objectives import LMHead

    h, w, tok, mask, teacher = _case(8192, 151936, 4096, 32, torch.bfloat16)
    h.requires_grad_(True)
    w.requires_grad_(True)
    logits_s, logits_gib = _measure(lambda a, b: a @ b.T, h, w, tok, mask, teacher)
    print(f"\n[gpu] aopd_loss fwd+bwd logits path: {logits_s * 1000:.1f} ms, peak {logits_gib:.2f} GiB above inputs")
    results = {}
    for chunk in (512, 1024, 2048, 4096):
        results[chunk] = _measure(lambda a, b: LMHead(a, b, chunk_size=chunk), h, w, tok, mask, teacher)
        print(f"[gpu] aopd_loss fwd+bwd LMHead chunk {chunk}: {results[chunk][0] * 1000:.1f} ms, "
              f"peak {results[chunk][1]:.2f} GiB")
    assert results[1024][1] <= logits_gib / 3
    assert results[1024][0] <= 1.5 * logits_s


def test_lab_distillation_runs_in_bf16_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("AOPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    from aopd_cli.config.compose import load_stage_config
    from aopd_cli.stages.runner import run_stage

    common = ["tracking.enabled=false", "eval.limit=8", "eval.n=2", "eval.k=[1,2]", "train.batch_size=16",
              "train.micro_batch_size=8"]
    teacher = run_stage(load_stage_config("warmup", common + ["student=lab_teacher", "train.steps=20",
                                                              "output_dir=teacher"]))
    for objective in ("aopd", "gkd", "exopd", "seqkd"):
        config = load_stage_config("distill", common + [f"objective={objective}", f"student.path={teacher}",
                                                        f"teacher.path={teacher}", "train.steps=2",
                                                        "train.eval_every=1", f"output_dir=d_{objective}"])
        checkpoint = run_stage(config)
        assert (checkpoint / "model.safetensors").is_file()
    from aopd_cli.config.schema import ModelConfig
    from aopd_cli.training.models import load_policy

    policy = load_policy(ModelConfig(path=str(checkpoint)), role="student")
    assert policy.device.type == "cuda" and next(policy.model.parameters()).dtype == torch.bfloat16
