"""Rollout and teacher-scoring speed on this machine: tokens/s of HF `generate` and of the vLLM engine
(both through aopd's rollouts, so what a stage gets), the weight sync into the engine, teacher top-K
scoring per 1,000 response tokens on every teacher engine (HF, in-process vLLM, a vLLM OpenAI server,
`aopd teacher serve`), and with `--distill` the lab's distillation step with the HF teacher against the
served one. Models: the lab student (0.1M parameters) and teacher (0.6M) and a ~20M Qwen3, all built from
a config with the lab tokenizer and random weights. Each measurement runs in its own process (an
in-process engine changes its process: threads, RNG, a process group); markdown tables are printed.

    OMP_NUM_THREADS=1 python benchmarks/rollout.py --prompts 64 --n 4 --new-tokens 64
    python benchmarks/rollout.py --distill --rounds 3
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = {  # name -> LabArch fields (the lab's recipes, and a ~20M model of the same family)
    "lab_student": dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128),
    "lab_teacher": dict(hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=384),
    "qwen3_20m": dict(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=64, intermediate_size=2688),
}
KV_GIB = 0.5


def checkpoint(root: Path, name: str) -> Path:
    """The model saved like any checkpoint (the server and the vLLM scorer load from a folder)."""
    from transformers import AutoTokenizer

    from aopd_cli.config.schema import LabArch
    from aopd_cli.data.lab import ensure_lab
    from aopd_cli.training.models import _fresh_lab_model

    folder = root / name
    if not (folder / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(ensure_lab() / "tokenizer")
        model = _fresh_lab_model(LabArch(**ARCHS[name]), tokenizer, seed=0)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def prompts(tokenizer, count: int) -> list[list[int]]:
    from aopd_cli.data.prompts import chat_ids

    return [chat_ids(tokenizer, [{"role": "user", "content": f"What is {i} + {3 * i}? Think step by step."}],
                     add_generation_prompt=True) for i in range(count)]


def measure_generate(engine: str, folder: Path, args) -> dict:
    from aopd_cli.config.schema import ModelConfig, RolloutConfig
    from aopd_cli.rollout.engines import make_rollout
    from aopd_cli.training.models import load_policy

    policy = load_policy(ModelConfig(path=str(folder)), role="student", trainable=engine == "vllm")
    started = time.perf_counter()
    rollout = make_rollout(engine, policy, RolloutConfig(engine=engine, kv_cache_gib=KV_GIB, max_model_len=512),
                           batch_size=args.prompts * args.n)
    start_s = time.perf_counter() - started
    batch_prompts = prompts(policy.tokenizer, args.prompts)
    rollout.generate(batch_prompts[:2], n=1, temperature=1.0, max_new_tokens=4, seed=0)  # warm-up
    runs = []
    for repeat in range(args.repeats):
        started = time.perf_counter()
        batch = rollout.generate(batch_prompts, n=args.n, temperature=1.0, max_new_tokens=args.new_tokens, seed=repeat)
        runs.append((int(batch.response_mask_BR.sum()), time.perf_counter() - started))
    result = {"tokens_per_s": max(tokens / seconds for tokens, seconds in runs), "start_s": start_s}
    if engine == "vllm":
        syncs = []
        for _ in range(5):
            started = time.perf_counter()
            rollout.sync_weights()
            syncs.append(time.perf_counter() - started)
        result["sync_ms"] = sorted(syncs)[2] * 1000
    rollout.close()
    return result


def scoring_batch(tokenizer, args):
    """`args.sequences` chat prompts, each with `args.new_tokens` random response tokens (all counted)."""
    import torch

    from aopd_cli.rollout.interface import RolloutBatch, left_pad, right_pad
    from aopd_cli.stages.onpolicy import rollout_micro_batches

    generator = torch.Generator().manual_seed(0)
    chats = prompts(tokenizer, args.sequences)
    responses = [torch.randint(3, len(tokenizer), (args.new_tokens,), generator=generator).tolist() for _ in chats]
    prompt_ids, prompt_mask = left_pad(chats, tokenizer.pad_token_id)
    response_ids, valid = right_pad(responses, tokenizer.pad_token_id)
    batch = RolloutBatch(prompt_ids, prompt_mask, response_ids, valid, list(range(len(chats))))
    return rollout_micro_batches(batch, len(chats))[0]


def measure_scoring(engine: str, folder: Path, args) -> dict:
    from contextlib import ExitStack

    from aopd_cli.config.schema import ModelConfig, TeacherConfig
    from aopd_cli.teacher.scorers import teacher_scorer
    from aopd_cli.training.models import load_policy

    student = load_policy(ModelConfig(path=str(folder)), role="student")
    kind = "server" if engine in ("openai", "service") else engine
    config = TeacherConfig(path=str(folder), engine=kind, kv_cache_gib=KV_GIB, max_model_len=512)
    teacher = student if engine == "hf" else None
    micro = scoring_batch(student.tokenizer, args)
    with ExitStack() as stack:
        started = time.perf_counter()
        if engine == "openai":  # a plain vLLM OpenAI server (a team's), then asked by url
            from aopd_cli.teacher.openai_server import running_openai_server

            url = stack.enter_context(running_openai_server(config, args.top_k, "float32",
                                                            Path(tempfile.mkdtemp()) / "server.log"))
            config = config.model_copy(update={"url": url})
        score = stack.enter_context(teacher_scorer(config, teacher, student, args.top_k, Path(tempfile.mkdtemp())))
        start_s = time.perf_counter() - started
        score(micro)  # warm-up
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            score(micro)
            times.append(time.perf_counter() - started)
    tokens = int(micro.mask_BT.sum())
    return {"ms_per_1k_tokens": min(times) / tokens * 1e6, "start_s": start_s, "tokens": tokens}


def run_one(kind: str, engine: str, name: str, args) -> dict:
    """One measurement in a fresh process (its JSON on the last line of stdout)."""
    command = [sys.executable, __file__, "--one", kind, engine, name, "--root", str(args.root)] + [
        f"--{key.replace('_', '-')}={getattr(args, key)}" for key in ("prompts", "n", "new_tokens", "sequences",
                                                                       "top_k", "repeats")]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def distill_steps(args) -> None:
    """`aopd distill` on the lab's shapes (random weights), the teacher in-process (HF or vLLM) or served by
    `aopd teacher serve` (started by the stage; scored before the update, or beside it), one and four
    micro-batches a step: the median step time (steps after the first two), and the scoring wall time and wait."""
    import statistics

    from aopd_cli.tracking.store import connect

    student, teacher = checkpoint(args.root, "lab_student"), checkpoint(args.root, "lab_teacher")
    work = Path(tempfile.mkdtemp(prefix="aopd-bench-distill-"))
    print(f"# lab distill steps: batch 32 prompts x 64 new tokens, K={args.top_k}, {args.steps} steps each, "
          f"load {os.getloadavg()[0]:.1f} at the start\n")
    print("| round | teacher | micro-batches a step | step s (median) | teacher s | teacher wait s |\n"
          "|---|---|---|---|---|---|")
    steps = {}  # (engine, micro-batches) -> each round's median step
    for round_ in range(1, args.rounds + 1):  # rounds interleave the engines: the machine's drift hits them alike
        for micro in (32, 8):
            # in-process vLLM: what the served engine costs before HTTP; "server, overlapped": the update's
            # forward beside the scoring (teacher.overlap=true), which on a CPU trainer is not the default
            for engine in ("hf", "vllm", "server", "server, overlapped"):
                out = work / f"{engine.replace(', ', '-')}-{micro}-{round_}"
                command = [sys.executable, "-m", "aopd_cli", "distill", f"student.path={student}",
                           f"teacher.path={teacher}", f"teacher.engine={engine.split(',')[0]}",
                           f"teacher.overlap={str(',' in engine).lower()}", f"objective.top_k={args.top_k}",
                           f"train.steps={args.steps}", f"train.micro_batch_size={micro}", "train.eval_every=0",
                           "eval.benchmarks=[]", "teacher.max_model_len=512", f"teacher.kv_cache_gib={KV_GIB}",
                           f"output_dir={out}"]
                done = subprocess.run(command, cwd=work, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"| {round_} | {engine} | {32 // micro} | failed: "
                          f"{done.stderr.strip().splitlines()[-1][:120]} | | |")
                    continue
                client = connect(f"sqlite:///{work}/mlflow.db")
                run_id = json.loads((out / "aopd_run.json").read_text())["run_id"]

                def median(key):
                    values = [m.value for m in client.get_metric_history(run_id, key) if m.step > 2]
                    return statistics.median(values) if values else None

                steps.setdefault((engine, 32 // micro), []).append(median("time/step_s"))
                cells = [median(key) for key in ("time/step_s", "time/teacher_s", "time/teacher_wait_s")]
                print(f"| {round_} | {engine} | {32 // micro} | "
                      + " | ".join("-" if cell is None else f"{cell:.3f}" for cell in cells) + " |", flush=True)
    print("\n| teacher | micro-batches a step | step s, median of the rounds | step / hf |\n|---|---|---|---|")
    for (engine, micro), values in steps.items():
        hf = statistics.median(steps.get(("hf", micro), [float("nan")]))
        print(f"| {engine} | {micro} | {statistics.median(values):.3f} | {statistics.median(values) / hf:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(ARCHS))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sequences", type=int, default=32, help="sequences per teacher scoring call")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-server", action="store_true", help="skip the servers (the OpenAI one takes ~30-60 s)")
    parser.add_argument("--no-generate", action="store_true", help="skip the rollout table")
    parser.add_argument("--distill", action="store_true", help="the lab's distillation step, HF teacher vs served")
    parser.add_argument("--steps", type=int, default=12, help="--distill: steps of each run")
    parser.add_argument("--rounds", type=int, default=1, help="--distill: each engine's run, this many times over")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "aopd-bench-models")
    parser.add_argument("--one", nargs=3, metavar=("KIND", "ENGINE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, engine, name = args.one
        folder = checkpoint(args.root, name)
        result = (measure_generate if kind == "generate" else measure_scoring)(engine, folder, args)
        print(json.dumps(result))
        return
    names = args.models.split(",")
    for name in names:
        checkpoint(args.root, name)
    if args.distill:
        distill_steps(args)
        return
    print(f"# rollout and scoring speed (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"{os.cpu_count()} CPUs; {args.prompts} prompts x n={args.n} x {args.new_tokens} new tokens; scoring "
          f"{args.sequences} sequences x {args.new_tokens} response tokens, K={args.top_k})\n")
    def cell(result, key, digits=0):
        return result["error"] if "error" in result else f"{result[key]:,.{digits}f}"

    if not args.no_generate:
        print("| model | HF generate tok/s | vLLM tok/s | vLLM start s | sync ms |\n|---|---|---|---|---|")
        for name in names:
            hf, vllm = run_one("generate", "hf", name, args), run_one("generate", "vllm", name, args)
            print(f"| {name} | {cell(hf, 'tokens_per_s')} | {cell(vllm, 'tokens_per_s')} | "
                  f"{cell(vllm, 'start_s', 1)} | {cell(vllm, 'sync_ms', 1)} |", flush=True)
        print()
    engines = ["hf", "vllm"] + ([] if args.no_server else ["openai", "service"])
    print("| model | " + " | ".join(f"score {e} ms/1k tok" for e in engines) + " | service / vLLM | "
          "OpenAI start s | service start s |")
    print("|---" * (len(engines) + 4) + "|")
    for name in names:
        scores = {engine: run_one("score", engine, name, args) for engine in engines}
        ratio = "-"
        if "service" in scores and "error" not in scores["service"] and "error" not in scores["vllm"]:
            ratio = f"{scores['service']['ms_per_1k_tokens'] / scores['vllm']['ms_per_1k_tokens']:.2f}x"
        starts = [cell(scores[e], "start_s", 1) if e in scores else "-" for e in ("openai", "service")]
        print(f"| {name} | " + " | ".join(cell(scores[e], "ms_per_1k_tokens", 1) for e in engines)
              + f" | {ratio} | {starts[0]} | {starts[1]} |", flush=True)


if __name__ == "__main__":
    main()
