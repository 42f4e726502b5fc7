"""Property tests of the losses against method.md, written from the equations, not from the code."""

import math

import pytest
import torch

from aopd_cli.training.objectives import (
    LMHead,
    TeacherTopK,
    aopd_loss,
    exopd_loss,
    gkd_loss,
    global_normalizer,
    opd_loss,
    seqkd_loss,
)

torch.set_default_dtype(torch.float64)


def make_case(B=3, T=5, V=11, K=4, seed=0, teacher_logits=None):
    gen = torch.Generator().manual_seed(seed)
    student_logits = torch.randn(B, T, V, generator=gen) * 2
    if teacher_logits is None:
        teacher_logits = torch.randn(B, T, V, generator=gen) * 2
    tokens = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[0, 0] = True
    teacher_logp = torch.log_softmax(teacher_logits, -1)
    topk_logp, topk_ids = teacher_logp.topk(K, dim=-1)
    teacher = TeacherTopK(teacher_logp.gather(-1, tokens[..., None])[..., 0], topk_ids, topk_logp)
    return student_logits.requires_grad_(True), tokens, mask, teacher, teacher_logp


def seq_mean(per_token_BT, mask):
    counts = mask.sum(-1)
    seqs = counts > 0
    per_seq = (per_token_BT * mask).sum(-1)[seqs] / counts[seqs]
    return per_seq.mean()


def reference_terms(student_logits, tokens, teacher, teacher_logp):
    student_logp = torch.log_softmax(student_logits, -1)
    s_tok = student_logp.gather(-1, tokens[..., None])[..., 0]
    adv = (teacher.token_logprobs - s_tok).detach()
    s_sup = student_logp.gather(-1, teacher.topk_ids)
    return student_logp, s_tok, adv, s_sup


def test_opd_matches_the_k1_policy_gradient():
    s, tok, mask, teacher, t_logp = make_case()
    out = opd_loss(s, tok, mask, teacher)
    _, s_tok, adv, _ = reference_terms(s, tok, teacher, t_logp)
    assert torch.allclose(out.loss, seq_mean(-adv * s_tok, mask))
    # the advantage is a stop-gradient: dL/dlogp_S(y) = -A / (|y| * n_seq)
    (grad,) = torch.autograd.grad(out.loss, s)
    (ref_grad,) = torch.autograd.grad(seq_mean(-adv * s_tok, mask), s)
    assert torch.allclose(grad, ref_grad)


def test_tau_minus_one_is_opd_and_tau_one_is_topk_fkl_over_k():
    s, tok, mask, teacher, t_logp = make_case()
    assert torch.allclose(aopd_loss(s, tok, mask, teacher, tau=-1.0).loss, opd_loss(s, tok, mask, teacher).loss)
    out = aopd_loss(s, tok, mask, teacher, tau=1.0)
    _, _, _, s_sup = reference_terms(s, tok, teacher, t_logp)
    p_t = teacher.topk_logprobs.exp()
    fkl = (p_t * (teacher.topk_logprobs - s_sup)).sum(-1) / teacher.topk_ids.shape[-1]
    assert torch.allclose(out.loss, seq_mean(fkl, mask))
    assert out.metrics["intervention_ratio"] == 1.0
    assert aopd_loss(s, tok, mask, teacher, tau=-1.0).metrics["intervention_ratio"] == 0.0


def test_tau_minus_one_never_gates_even_when_teacher_prob_underflows():
    s, tok, mask, teacher, _ = make_case(B=1, T=1, V=3, K=2)
    mask = torch.ones(1, 1, dtype=torch.bool)
    s = torch.tensor([[[0.0, -1e4, -1e4]]], requires_grad=True)  # P_S(y=0) == 1.0 exactly
    tok = torch.zeros(1, 1, dtype=torch.long)
    teacher = TeacherTopK(torch.tensor([[-1e4]]), torch.tensor([[[1, 2]]]), torch.tensor([[[-0.7, -0.7]]]))
    out = aopd_loss(s, tok, mask, teacher, tau=-1.0)
    assert out.metrics["intervention_ratio"] == 0.0
    assert torch.isfinite(out.loss)


def test_gate_uses_probabilities_not_log_ratios():
    # P_T(y) = 0.30, P_S(y) = 0.10: the probability gap is 0.20, the log-ratio is log 3 = 1.10.
    # With tau = 0.5 the gap passes the threshold (gated) while the log-ratio would not.
    student_logits = torch.log(torch.tensor([[[0.10, 0.30, 0.30, 0.30]]])).requires_grad_(True)
    teacher_logp = torch.log(torch.tensor([[[0.30, 0.50, 0.10, 0.10]]]))
    tokens = torch.zeros(1, 1, dtype=torch.long)
    topk_logp, topk_ids = teacher_logp.topk(2, -1)
    teacher = TeacherTopK(teacher_logp[..., 0], topk_ids, topk_logp)
    mask = torch.ones(1, 1, dtype=torch.bool)
    assert aopd_loss(student_logits, tokens, mask, teacher, tau=0.5).metrics["intervention_ratio"] == 1.0
    # and at tau = 0.1 the gap (0.2 > 0.1) is not gated, although log-ratio - tau > 0 too
    assert aopd_loss(student_logits, tokens, mask, teacher, tau=0.1).metrics["intervention_ratio"] == 0.0
    # a negative tau: gap -0.25 <= -0.2 gated, although the log-ratio (-0.92) and gap disagree in scale
    teacher2 = TeacherTopK(torch.log(torch.tensor([[0.05]])), topk_ids, topk_logp)
    student2 = torch.log(torch.tensor([[[0.30, 0.30, 0.30, 0.10]]])).requires_grad_(True)
    assert aopd_loss(student2, tokens, mask, teacher2, tau=-0.2).metrics["intervention_ratio"] == 1.0
    assert aopd_loss(student2, tokens, mask, teacher2, tau=-0.3).metrics["intervention_ratio"] == 0.0


def test_tau_zero_gates_exactly_the_non_positive_advantages():
    s, tok, mask, teacher, t_logp = make_case(B=4, T=16, seed=3)
    out = aopd_loss(s, tok, mask, teacher, tau=0.0)
    _, s_tok, adv, s_sup = reference_terms(s, tok, teacher, t_logp)
    gate = adv <= 0
    assert float(out.metrics["intervention_ratio"]) == pytest.approx(gate[mask].double().mean().item())
    fkl = (teacher.topk_logprobs.exp() * (teacher.topk_logprobs - s_sup)).sum(-1) / 4
    ref = torch.where(gate, fkl, -adv * s_tok)
    assert torch.allclose(out.loss, seq_mean(ref, mask))


def test_beta_endpoints_are_forward_and_reverse_kl_and_half_is_jsd():
    s, tok, mask, teacher, t_logp = make_case()
    _, _, _, s_sup = reference_terms(s, tok, teacher, t_logp)
    pt, lt, ps = teacher.topk_logprobs.exp(), teacher.topk_logprobs, s_sup.exp()
    fkl = (pt * (lt - s_sup)).sum(-1)
    rkl = (ps * (s_sup - lt)).sum(-1)
    m = 0.5 * pt + 0.5 * ps
    jsd = 0.5 * (pt * (lt - m.log())).sum(-1) + 0.5 * (ps * (s_sup - m.log())).sum(-1)
    assert torch.allclose(gkd_loss(s, tok, mask, teacher, beta=1.0).loss, seq_mean(fkl, mask))
    assert torch.allclose(gkd_loss(s, tok, mask, teacher, beta=0.0).loss, seq_mean(rkl, mask))
    assert torch.allclose(gkd_loss(s, tok, mask, teacher, beta=0.5).loss, seq_mean(jsd, mask))
    # beta = 0.9 follows M = (1 - beta) P_T + beta P_S (method.md), i.e. TRL with beta_trl = 0.1
    m9 = 0.1 * pt + 0.9 * ps
    d9 = 0.1 * (pt * (lt - m9.log())).sum(-1) + 0.9 * (ps * (s_sup - m9.log())).sum(-1)
    assert torch.allclose(gkd_loss(s, tok, mask, teacher, beta=0.9).loss, seq_mean(d9, mask))
    # AOPD's guidance takes the same family, scaled by 1/K
    out = aopd_loss(s, tok, mask, teacher, tau=1.0, beta=0.0)
    assert torch.allclose(out.loss, seq_mean(rkl / 4, mask))


def test_full_support_renorm_equals_full_kl():
    V = 7
    s, tok, mask, teacher, t_logp = make_case(V=V, K=V)
    s_logp = torch.log_softmax(s, -1)
    full_fkl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    full_rkl = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    for support in ("renorm", "raw", "tail"):
        assert torch.allclose(gkd_loss(s, tok, mask, teacher, beta=1.0, support=support).loss,
                              seq_mean(full_fkl, mask), atol=1e-6)
        assert torch.allclose(gkd_loss(s, tok, mask, teacher, beta=0.0, support=support).loss,
                              seq_mean(full_rkl, mask), atol=1e-6)


def test_tail_support_adds_the_remaining_mass_bucket():
    s, tok, mask, teacher, t_logp = make_case()
    _, _, _, s_sup = reference_terms(s, tok, teacher, t_logp)
    pt = torch.cat([teacher.topk_logprobs.exp(), 1 - teacher.topk_logprobs.exp().sum(-1, keepdim=True)], -1)
    ps = torch.cat([s_sup.exp(), 1 - s_sup.exp().sum(-1, keepdim=True)], -1)
    fkl = (pt * (pt.log() - ps.log())).sum(-1)
    assert torch.allclose(gkd_loss(s, tok, mask, teacher, beta=1.0, support="tail").loss, seq_mean(fkl, mask))


def test_renorm_guidance_gradient_is_ps_minus_pt_over_k():
    B, T, V, K = 1, 1, 9, 4
    s, tok, mask, teacher, _ = make_case(B, T, V, K, seed=5)
    mask = torch.ones(B, T, dtype=torch.bool)
    out = aopd_loss(s, tok, mask, teacher, tau=1.0, support="renorm")
    (grad,) = torch.autograd.grad(out.loss, s)
    ids = teacher.topk_ids[0, 0]
    ps = torch.softmax(s[0, 0, ids].detach(), -1)
    pt = torch.softmax(teacher.topk_logprobs[0, 0], -1)
    expected = torch.zeros(V)
    expected[ids] = (ps - pt) / K
    assert torch.allclose(grad[0, 0], expected)


def test_identical_teacher_and_student_give_zero_advantage_and_kl():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 13, generator=gen)
    s, tok, mask, teacher, _ = make_case(B=2, T=6, V=13, teacher_logits=logits)
    s = logits.clone().requires_grad_(True)
    out = aopd_loss(s, tok, mask, teacher, tau=0.0)
    assert abs(out.metrics["adv_mean"]) < 1e-12 and out.metrics["adv_std"] < 1e-12
    assert abs(out.metrics["fkl"]) < 1e-12
    assert out.metrics["adv_zero_frac"] == 1.0
    assert abs(opd_loss(s, tok, mask, teacher).loss.item()) < 1e-12
    # A = 0 <= tau = 0: every token takes the guidance branch, whose value is 0 at the optimum
    assert out.metrics["intervention_ratio"] == 1.0 and abs(out.loss.item()) < 1e-12


def test_exopd_with_lam_one_is_opd_and_default_extrapolates():
    s, tok, mask, teacher, t_logp = make_case()
    base = torch.log_softmax(torch.randn(3, 5, 11), -1).gather(-1, tok[..., None])[..., 0]
    assert torch.allclose(exopd_loss(s, tok, mask, teacher, base_logprobs=base, lam=1.0).loss,
                          opd_loss(s, tok, mask, teacher).loss)
    _, s_tok, _, _ = reference_terms(s, tok, teacher, t_logp)
    adv = 1.25 * (teacher.token_logprobs - base) - (s_tok.detach() - base)
    assert torch.allclose(exopd_loss(s, tok, mask, teacher, base_logprobs=base).loss, seq_mean(-adv * s_tok, mask))


def test_seqkd_is_mean_nll():
    s, tok, mask, _, _ = make_case()
    s_tok = torch.log_softmax(s, -1).gather(-1, tok[..., None])[..., 0]
    assert torch.allclose(seqkd_loss(s, tok, mask).loss, seq_mean(-s_tok, mask))
    assert torch.allclose(seqkd_loss(s, tok, mask, reduction="token-mean").loss, -s_tok[mask].mean())


@pytest.mark.parametrize("reduction", ["seq-mean-token-mean", "token-mean"])
def test_micro_batches_with_global_normalizer_add_up_to_the_whole_batch(reduction):
    s, tok, mask, teacher, _ = make_case(B=6, T=9, seed=11)
    mask[3] = False  # a sequence without counted tokens does not count in the normaliser
    whole = aopd_loss(s, tok, mask, teacher, reduction=reduction)
    (grad_whole,) = torch.autograd.grad(whole.loss, s)
    norm = global_normalizer(mask, reduction)
    total = 0
    for part in (slice(0, 1), slice(1, 4), slice(4, 6)):
        t = TeacherTopK(teacher.token_logprobs[part], teacher.topk_ids[part], teacher.topk_logprobs[part])
        total = total + aopd_loss(s[part], tok[part], mask[part], t, reduction=reduction, normalizer=norm).loss
    (grad_parts,) = torch.autograd.grad(total, s)
    assert torch.allclose(total, whole.loss)
    assert torch.allclose(grad_parts, grad_whole)


def test_no_counted_token_gives_zero_loss_and_finite_grads():
    s, tok, mask, teacher, _ = make_case()
    empty = torch.zeros_like(mask)
    for fn in (opd_loss, aopd_loss, gkd_loss):
        out = fn(s, tok, empty, teacher)
        (grad,) = torch.autograd.grad(out.loss, s)
        assert out.loss.item() == 0.0 and torch.isfinite(grad).all()
        assert all(math.isfinite(v) for v in out.metrics.values())


def test_underflowing_student_probabilities_stay_finite():
    s, tok, mask, teacher, _ = make_case(V=11)
    extreme = (s.detach() * 500).float().requires_grad_(True)  # probabilities underflow to 0 in float32
    t32 = TeacherTopK(teacher.token_logprobs.float(), teacher.topk_ids, teacher.topk_logprobs.float())
    for kwargs in ({"support": "raw"}, {"support": "tail"}, {"support": "renorm"}, {"beta": 0.0}, {"beta": 0.5}):
        out = aopd_loss(extreme, tok, mask, t32, tau=1.0, **kwargs)
        (grad,) = torch.autograd.grad(out.loss, extreme)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all(), kwargs
    out = aopd_loss(extreme, tok, mask, TeacherTopK(torch.full_like(t32.token_logprobs, -math.inf),
                                                      t32.topk_ids, t32.topk_logprobs))
    assert torch.isfinite(out.loss)


def test_bf16_logits_are_computed_in_float32():
    s, tok, mask, teacher, _ = make_case()
    ref = opd_loss(s.detach().bfloat16().double(), tok, mask, teacher).loss
    out = opd_loss(s.detach().bfloat16(), tok, mask, teacher).loss
    assert out.dtype == torch.float64 or out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, rtol=1e-5)


def test_accuracy_intervention_only_guides_wrong_trajectories():
    s, tok, mask, teacher, _ = make_case(B=3, T=8, seed=2)
    correct = torch.tensor([True, False, True])
    out = aopd_loss(s, tok, mask, teacher, tau=1.0, intervention="accuracy", correct=correct)
    # tau = 1 gates everything, so the ratio is the share of counted tokens in wrong trajectories
    assert float(out.metrics["intervention_ratio"]) == pytest.approx(mask[1].sum().item() / mask.sum().item())
    with pytest.raises(ValueError, match="correct"):
        aopd_loss(s, tok, mask, teacher, intervention="accuracy")


def test_zero_intervention_gates_near_zero_advantages():
    s, tok, mask, teacher, t_logp = make_case(B=4, T=16, seed=9)
    _, _, adv, _ = reference_terms(s, tok, teacher, t_logp)
    out = aopd_loss(s, tok, mask, teacher, intervention="zero", zero_eps=0.5)
    assert float(out.metrics["intervention_ratio"]) == pytest.approx((adv[mask].abs() <= 0.5).double().mean().item())


@pytest.mark.parametrize("objective", ["opd", "aopd", "gkd", "seqkd"])
def test_lmhead_path_matches_logits_path(objective):
    torch.manual_seed(0)
    B, T, H, V, K = 3, 7, 16, 50, 5
    hidden = torch.randn(B, T, H, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float32, requires_grad=True)
    teacher_logp = torch.log_softmax(torch.randn(B, T, V, dtype=torch.float32) * 3, -1)
    tok = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.2
    topk_logp, topk_ids = teacher_logp.topk(K, -1)
    teacher = TeacherTopK(teacher_logp.gather(-1, tok[..., None])[..., 0], topk_ids, topk_logp)
    fns = {"opd": lambda st: opd_loss(st, tok, mask, teacher),
           "aopd": lambda st: aopd_loss(st, tok, mask, teacher, tau=0.05),
           "gkd": lambda st: gkd_loss(st, tok, mask, teacher, support="tail"),
           "seqkd": lambda st: seqkd_loss(st, tok, mask)}
    ref = fns[objective](hidden @ weight.T)
    ref_grads = torch.autograd.grad(ref.loss, (hidden, weight))
    out = fns[objective](LMHead(hidden, weight, chunk_size=4))
    grads = torch.autograd.grad(out.loss, (hidden, weight))
    assert torch.allclose(out.loss, ref.loss, rtol=1e-5, atol=1e-7)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-6)
    assert float(out.metrics["entropy"]) == pytest.approx(float(ref.metrics["entropy"]), rel=1e-5)
