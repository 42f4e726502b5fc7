"""The lab: its data splits, ToolAlpaca's multi-turn tool evaluation (with a scripted model), per-turn
tool prompts, the greedy column, the report, and `lab_full_smoke` end to end (slow)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from cli_runs import distill_args, run_aopd

from aopd_cli import metrics as names
from aopd_cli.config.schema import EvalConfig
from aopd_cli.data.loaders import load_records
from aopd_cli.data.prompts import tool_sft_messages, tool_turns
from aopd_cli.eval.harness import evaluate_policy, run_episodes
from aopd_cli.eval.tools import STUB_OBSERVATION, grade_episode, grade_turn
from aopd_cli.rollout.interface import RolloutBatch, left_pad, mask_through_first_stop, right_pad

FIX = Path(__file__).parent / "fixtures"


def scripted(tokenizer, answer, calls: list | None = None):
    """A policy and rollout whose response to a prompt is `answer(prompt text)`; `calls` records each
    generate call's keyword arguments. A response ending in `Observation:` stops there (a stop string),
    any other ends with the end-of-turn token."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    policy = SimpleNamespace(tokenizer=tokenizer, stop_ids={end})

    def generate(prompts_ids, *, n, temperature, max_new_tokens, seed=None, indices=None, stop_strings=None):
        if calls is not None:
            calls.append({"n": n, "temperature": temperature, "stop_strings": stop_strings})
        rows = [(i, ids) for i, ids in enumerate(prompts_ids) for _ in range(n)]
        responses = []
        for _, ids in rows:
            text = answer(tokenizer.decode(ids))
            suffix = [] if text.endswith("Observation:") else [end]
            responses.append((tokenizer(text, add_special_tokens=False)["input_ids"] + suffix)[:max_new_tokens])
        prompt_ids, prompt_mask = left_pad([ids for _, ids in rows], tokenizer.pad_token_id)
        response_ids, valid = right_pad(responses, tokenizer.pad_token_id)
        return RolloutBatch(prompt_ids, prompt_mask, response_ids, mask_through_first_stop(response_ids, {end}, valid),
                            [i for i, _ in rows])

    return policy, SimpleNamespace(generate=generate, sync_weights=lambda: None)


def test_lab_splits_are_disjoint_and_tool_records_carry_observations(lab_cache):
    train = {r["problem"] for r in load_records("prompts", "lab_math")}
    test = {r["problem"] for r in load_records("math_benchmark", "lab_math")}
    dev = {r["problem"] for r in load_records("math_benchmark", "lab_math_dev")}
    assert len(test) == len(dev) == 200 and not (train & test) and not (train & dev) and not (test & dev)
    tool_train = {r["instruction"] for r in load_records("tool_train", "lab_tools")}
    tool_test, tool_dev = load_records("tool_eval", "lab_tools"), load_records("tool_eval", "lab_tools_dev")
    assert len(tool_test) == len(tool_dev) == 50
    held_out = {r["instruction"] for r in tool_test + tool_dev}
    assert not tool_train & held_out and len(held_out) == 100
    assert all(step["observation"] for r in tool_test for step in r["golden"])
    assert {len(r["golden"]) for r in tool_test} == {1, 2}


def test_generic_tool_text_has_the_task_words_but_none_of_its_instructions(lab_cache):
    """The students' scrambled tool text (lab_tools_generic): the task's functions and keys, the question's
    digits as the values in order, and no instruction of the task's train, test or dev split."""
    import json

    from aopd_cli.data.lab import APIS, GENERIC_KEYS

    generic = load_records("tool_train", "lab_tools_generic")
    assert len(generic) == 400 and {len(r["steps"]) for r in generic} == {1, 2}
    assert {s["action"] for r in generic for s in r["steps"]} == {fn for api in APIS.values() for fn in api}
    for record in generic:
        args = [json.loads(s["action_input"]) for s in record["steps"]]
        assert all(set(a) <= set(GENERIC_KEYS) for a in args)
        assert record["instruction"] == "item " + " and ".join(str(v) for a in args for v in a.values()) + "?"
    task = {r["instruction"] for r in load_records("tool_train", "lab_tools")}
    task |= {r["instruction"] for split in ("lab_tools", "lab_tools_dev") for r in load_records("tool_eval", split)}
    assert not task & {r["instruction"] for r in generic}


def test_compact_episodes_feed_golden_observations_back_as_user_turns(lab_tokenizer, lab_cache):
    record = next(r for r in load_records("tool_eval", "lab_tools") if r["api"] == "BookShelf")
    search, reviews = record["golden"]

    def answer(prompt):  # a model that copies the id the observation returned
        if "Observation:" not in prompt:
            return f"Action: searchBooks\nAction Input: {search['action_input']}"
        if prompt.count("Observation:") == 1:
            assert search["observation"] in prompt  # the golden observation came back
            return f"Action: getReviews\nAction Input: {reviews['action_input']}"
        return "Final Answer: 3 stars"

    policy, rollout = scripted(lab_tokenizer, answer)
    episode = run_episodes(policy, rollout, [record], style="compact", n=1, temperature=1.0, max_new_tokens=64,
                           seed=0)[0]
    assert [m["role"] for m in episode.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert episode.messages[2]["content"] == f"Observation: {search['observation']}"
    assert episode.finished and grade_episode(episode, record["golden"]).success
    # the right calls without an answer (out of tokens) is not a success
    policy, rollout = scripted(lab_tokenizer, lambda p: answer(p) if "Observation:" not in p or p.count(
        "Observation:") == 1 else "Final Answer: " + "9" * 80)
    episode = run_episodes(policy, rollout, [record], style="compact", n=1, temperature=1.0, max_new_tokens=64,
                           seed=0)[0]
    assert not episode.finished and not grade_episode(episode, record["golden"]).success


def test_full_react_style_stops_at_observation_and_continues_the_turn(lab_tokenizer):
    record = load_records("tool_eval", str(FIX / "toolalpaca"))[0]  # getCurrentWeather Paris, no observation given

    def answer(prompt):
        if "ASSISTANT Observation:" not in prompt.split("USER: ")[-1]:
            # the model writes the ReAct format inline and runs on past the call
            return ('ASSISTANT Thought: look it up\nASSISTANT Action: getCurrentWeather\nASSISTANT Action Input: '
                    '{"city": "Paris"}\nASSISTANT Observation:')
        assert prompt.rstrip().endswith(STUB_OBSERVATION) and not prompt.rstrip().endswith("<|im_end|>")
        return "ASSISTANT Thought: done\nASSISTANT Response: It is sunny."

    calls = []
    policy, rollout = scripted(lab_tokenizer, answer, calls)
    episode = run_episodes(policy, rollout, [record], style="full", n=1, temperature=1.0, max_new_tokens=200,
                           seed=0)[0]
    assert calls[0]["stop_strings"] == ["Observation:"]
    assert len(episode.turns) == 2 and episode.open_turn and episode.finished
    assert grade_episode(episode, record["golden"]).success


def test_success_is_per_instruction_mean_of_its_samples_and_greedy_is_reported(lab_tokenizer, lab_cache):
    records = load_records("tool_eval", "lab_tools")[:2]  # two single-call weather instructions
    state = {"count": 0}

    def answer(prompt):
        if "Observation:" in prompt:
            return "Final Answer: 1"
        state["count"] += 1
        good = next(r for r in records if r["instruction"] in prompt)["golden"][0]
        # instruction 0 right in every sample; instruction 1 right in one sample of four (and greedy)
        right = records[0]["instruction"] in prompt or state["count"] % 4 == 0
        return f"Action: {good['action']}\nAction Input: {good['action_input'] if right else '{}'}"

    calls = []
    policy, rollout = scripted(lab_tokenizer, answer, calls)
    config = EvalConfig(tool_benchmarks=["lab_tools"], n=4, limit=2, greedy=True, tool_prompt_style="compact")
    metrics, samples = evaluate_policy(policy, rollout, config, seed=0)
    assert metrics[names.tool("lab_tools", "success")] == pytest.approx((1.0 + 0.25) / 2)
    assert names.greedy("lab_tools") in metrics and {c["temperature"] for c in calls} == {1.0, 0.0}
    assert len([s for s in samples if s["decoding"] == "sampled"]) == 8


def test_math_greedy_column_and_its_average(lab_tokenizer, lab_cache):
    records = load_records("math_benchmark", "lab_math")[:4]
    answers = {r["problem"]: r["answer"] for r in records}
    policy, rollout = scripted(lab_tokenizer, lambda p: "\\boxed{" + next(a for q, a in answers.items() if q in p) + "}")
    config = EvalConfig(benchmarks=["lab_math"], n=2, k=[1, 2], limit=4, greedy=True, prompt_suffix="")
    metrics, _ = evaluate_policy(policy, rollout, config, seed=0)
    assert metrics[names.greedy("lab_math")] == 1.0 == metrics[names.greedy(names.MATH_AVG)]
    assert names.parse_eval(names.greedy("lab_math")).kind == "greedy"


def test_tool_turns_prompt_each_assistant_turn_after_the_golden_history(lab_cache):
    record = next(r for r in load_records("tool_train", "lab_tools") if len(r["steps"]) == 2)
    turns = tool_turns([record], "compact")
    assert [len(t["messages"]) for t in turns] == [1, 3, 5]
    assert [t["expected"] for t in turns] == record["steps"] + [None]
    assert turns[2]["messages"] == tool_sft_messages(record, "compact")[:5]
    call = f"Action: {record['steps'][1]['action']}\nAction Input: {record['steps'][1]['action_input']}"
    assert grade_turn(call, turns[1]["expected"]) and not grade_turn(call, turns[0]["expected"])
    assert grade_turn("Final Answer: 4", None) and not grade_turn(call, None)


# ---------------------------------------------------------------- end to end
SMOKE = ["eval.limit=4", "eval.n=4", "eval.max_new_tokens=24", "eval.batch_size=64", "train.batch_size=8",
         "train.micro_batch_size=8", "rollout.max_new_tokens=24", "data.limit=64"]


def smoke_copy(experiment: Path, out: Path) -> Path:
    """lab_full in miniature: the same stages, tables and dependencies, a few steps each."""
    data = yaml.safe_load(experiment.read_text())
    sized = ("train.steps=", "train.batch_size=", "train.micro_batch_size=", "train.micro_batch_tokens=", "data.limit=")
    for stage in data["stages"]:
        steps = next((int(o.partition("=")[2]) for o in stage["overrides"] if o.startswith("train.steps=")), 100)
        stage["overrides"] = [o for o in stage["overrides"] if not o.startswith(sized)]
        if stage["stage"] != "eval":
            stage["overrides"] += [f"train.steps={max(2, steps // 150)}", "train.eval_every=1"]
    data["overrides"] = data.get("overrides", []) + SMOKE
    out.write_text(yaml.safe_dump(data))
    return out


@pytest.mark.slow
def test_lab_full_smoke_runs_every_method_and_the_report(tmp_path, lab_cache):
    smoke = smoke_copy(Path(__file__).parents[1] / "experiments" / "lab_full.yaml", tmp_path / "lab_full_smoke.yaml")
    cache = tmp_path / "cache"  # its own: the warm-ups it trains are counted
    result = run_aopd("sweep", "pipeline", f"experiment={smoke}", "--seeds", "2", cwd=tmp_path, cache=cache)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # four warm-ups trained once for both seeds; the teacher chained on teacher_math kept its cache key
    assert len(list((cache / "checkpoints").glob("warmup-*"))) == 4
    report = run_aopd("report", "--out", "docs/lab.md", cwd=tmp_path, cache=cache)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    text = (tmp_path / "docs/lab.md").read_text()
    for block in ("weak", "strong"):
        for method in ("SFT ckpt", "SeqKD", "OPD", "ExOPD", "GKD", "AOPD"):
            assert f"| {block} | {method} | " in text, (block, method)
    claims = ("**C1 (AOPD)**", "**C1 (baselines)**", "**C2 (AOPD)**", "**C3**", "**C4 (AOPD)**", "**C5 (AOPD)**")
    # without the ablation sweeps C6 is named with the command that runs them, not silently left out
    for part in ("Table 1", "Table 2", *claims, "| C6 (ablation_tau) | not judged", " ± "):
        assert part in text, part
    figures = {p.name for p in (tmp_path / "docs/lab").glob("*.png")}
    assert {"fig6_pass_at_1_weak.png", "fig6_pass_at_1_strong.png", "entropy_vs_step.png",
            "intervention_ratio_vs_step.png", "advantage_histogram.png", "table2_continual.png"} <= figures


# ---------------------------------------------------------------- intervention by accuracy (method.md)
def test_a_response_without_boxed_is_wrong_for_the_accuracy_gate():
    from aopd_cli.eval.math import grade_math

    assert grade_math("so the answer is 12", "12")  # evaluation still reads an unboxed final answer
    assert not grade_math("so the answer is 12", "12", require_boxed=True)  # a truncated response counts as wrong
    assert grade_math("3*4=12 \\boxed{12}", "12", require_boxed=True)


def test_accuracy_gate_in_the_continual_stage_grades_tool_turns(tmp_path, lab_cache, tiny_checkpoint):
    """Tool records have no math answer: each sampled turn is graded against its golden call (was a KeyError)."""
    out = tmp_path / "continual"
    args = distill_args(tiny_checkpoint, out, "objective=aopd", "objective.intervention=accuracy", "train.steps=1",
                        "eval.benchmarks=[]", "eval.tool_benchmarks=[]", "tracking.enabled=false")
    result = run_aopd("continual", *args[1:], cwd=tmp_path, cache=lab_cache)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (out / "checkpoint" / "model.safetensors").is_file()
