"""Time and peak memory of aopd_loss forward+backward: the logits path, the chunked LMHead path, and a
full-vocabulary generalized JSD as TRL's GKD trainer computes it. Each variant runs in its own process;
peak memory is the resident-set high-water mark (reset just before the measured call) minus the RSS then.

    python benchmarks/objectives.py --tokens 4096 --vocab 32768 --hidden 512 --top-k 32
"""

import argparse
import json
import subprocess
import sys
import time


def rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def measure(variant: str, tokens: int, vocab: int, hidden: int, top_k: int, repeats: int) -> dict:
    import torch

    from aopd_cli.training.objectives import LMHead, TeacherTopK, aopd_loss

    torch.manual_seed(0)
    hidden_BTH = torch.randn(1, tokens, hidden) / hidden**0.5
    weight_VH = torch.randn(vocab, hidden)
    tokens_BT = torch.randint(0, vocab, (1, tokens))
    mask_BT = torch.ones(1, tokens, dtype=torch.bool)
    teacher_logits = torch.randn(1, tokens, vocab) * 2 if variant == "trl-jsd" else None
    with torch.no_grad():  # a teacher's top-K from a random distribution (only the shapes matter here)
        fake_teacher = torch.log_softmax(torch.randn(1, tokens, top_k + 1) * 2, -1)[..., :top_k] - 3.0
    teacher = TeacherTopK(fake_teacher[..., 0], torch.randint(0, vocab, (1, tokens, top_k)), fake_teacher)

    def step():
        h = hidden_BTH.clone().requires_grad_(True)
        w = weight_VH.clone().requires_grad_(True)
        if variant == "lmhead":
            loss = aopd_loss(LMHead(h, w, chunk_size=1024), tokens_BT, mask_BT, teacher).loss
        elif variant == "logits":
            loss = aopd_loss(h @ w.T, tokens_BT, mask_BT, teacher).loss
        else:  # TRL GKDTrainer.generalized_jsd_loss, beta = 0.5, full vocabulary
            student_logp = torch.log_softmax(h @ w.T, -1)
            teacher_logp = torch.log_softmax(teacher_logits, -1)
            beta = torch.tensor(0.5)
            mixture = torch.logsumexp(torch.stack([student_logp + torch.log(1 - beta), teacher_logp + torch.log(beta)]), 0)
            kl_teacher = torch.nn.functional.kl_div(mixture, teacher_logp, reduction="none", log_target=True)
            kl_student = torch.nn.functional.kl_div(mixture, student_logp, reduction="none", log_target=True)
            loss = (beta * kl_teacher + (1 - beta) * kl_student).sum() / tokens
        loss.backward()

    step()  # warm-up
    times = []
    open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark
    before = rss_kib("VmRSS:")
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    peak = rss_kib("VmHWM:") - before
    return {"variant": variant, "seconds": min(times), "peak_mib": peak / 1024}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.tokens, args.vocab, args.hidden, args.top_k, args.repeats)))
        return
    rows = []
    for variant in ("logits", "lmhead", "trl-jsd"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens), "--vocab",
                              str(args.vocab), "--hidden", str(args.hidden), "--top-k", str(args.top_k),
                              "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"aopd_loss forward+backward, {args.tokens} tokens, V={args.vocab}, H={args.hidden}, K={args.top_k}")
    print(f"{'variant':<10} {'seconds':>8} {'peak MiB':>9}")
    for row in rows:
        print(f"{row['variant']:<10} {row['seconds']:>8.3f} {row['peak_mib']:>9.0f}")
    logits, lmhead = rows[0], rows[1]
    print(f"LMHead / logits: time x{lmhead['seconds'] / logits['seconds']:.2f}, "
          f"peak memory x{lmhead['peak_mib'] / logits['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
