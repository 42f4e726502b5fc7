"""`aopd plan`: model shapes, the memory of a step traced on aopd's code with fake tensors, the arithmetic
that must agree with it, and the paper's experiments on 8 GPUs."""

import pytest
from cli_runs import run_aopd

from aopd_cli.config.schema import AopdObjective, TrainConfig
from aopd_cli.experiment.pipeline import plan_pipeline
from aopd_cli.plan.estimate import scoring_parts, update_parts
from aopd_cli.plan.planner import plan_experiment, render
from aopd_cli.plan.shapes import GIB, QWEN3, Batch, Shape
from aopd_cli.plan.trace import extrapolate, trace_scoring, trace_update

SMALL = [  # (shape, world, micro-batch, activation checkpointing): the real vocabulary, small widths
    (Shape(4, 512, 4, 2, 128, 1536, 151936, False), 8, Batch(2, 1024), True),
    (Shape(4, 512, 4, 2, 128, 1536, 151936, False), 8, Batch(2, 1024), False),
    (Shape(4, 1024, 8, 4, 128, 3072, 151936, True), 4, Batch(1, 2048), True),
    (Shape(4, 1024, 8, 4, 128, 3072, 32000, False), 2, Batch(4, 512), False),
]


def test_known_shapes_give_the_published_parameter_counts():
    counts = {name: Shape(*shape).params / 1e9 for name, shape in QWEN3.items()}
    assert counts["Qwen/Qwen3-8B"] == pytest.approx(8.19, abs=0.01)
    assert counts["Qwen/Qwen3-32B"] == pytest.approx(32.76, abs=0.01)
    assert counts["Qwen/Qwen3-4B"] == pytest.approx(4.02, abs=0.01)


@pytest.mark.parametrize("shape, world, batch, checkpointing", SMALL)
def test_the_arithmetic_agrees_with_the_trace_within_15_percent(shape, world, batch, checkpointing):
    train = TrainConfig(activation_checkpointing=checkpointing)
    update = trace_update(shape, shape.layers, world, batch.rows, batch.response, AopdObjective(name="aopd"), train, 32)
    estimated = sum(update_parts(shape, world, batch, checkpointing).values())
    assert estimated == pytest.approx(update.peak["Total"], rel=0.15)
    assert update.residue == pytest.approx(12 * shape.params / world, rel=0.01)  # fp32 params + moments; no grads
    scoring = trace_scoring(shape, shape.layers, world, batch.rows, batch.response, 32)
    assert sum(scoring_parts(shape, world, batch, 32, "teacher").values()) == pytest.approx(scoring.peak["Total"],
                                                                                            rel=0.15)
    assert scoring.residue == pytest.approx(2 * shape.params / world, rel=0.05)  # the gathered root freed


def test_memory_is_linear_in_depth_so_two_shallow_traces_give_the_deep_one():
    shape, train = Shape(8, 512, 4, 2, 128, 1536, 151936, False), TrainConfig(activation_checkpointing=True)
    at = {d: trace_update(shape, d, 8, 2, 1024, AopdObjective(name="aopd"), train, 32) for d in (3, 4, 8)}
    deep = extrapolate({3: at[3], 4: at[4]}, 8)
    assert deep.peak["Total"] == pytest.approx(at[8].peak["Total"], rel=1e-3)
    assert deep.residue == pytest.approx(at[8].residue, rel=1e-3)


def test_the_paper_recipes_fit_on_8_x_80_gb_and_say_why_not_on_smaller_gpus():
    plan = plan_pipeline(["experiment=paper_8b_3k"])
    stages = {s.name: s for s in plan_experiment(plan, 8, 80, trace=False)}
    assert all(s.peak <= 80 * GIB for s in stages.values()), render(list(stages.values()), 8, 80)
    assert stages["aopd"].parts["student params + AdamW moments (fp32, sharded)"] == pytest.approx(
        12 * 8.19e9 / 8, rel=0.01)
    assert "vLLM sampling" in stages["aopd"].estimated and "teacher scoring" in stages["aopd"].estimated
    assert {"vLLM sampling", "vLLM evaluation"} <= set(stages["seqkd"].estimated)  # two engines, in turn
    small = {s.name: s for s in plan_experiment(plan, 8, 40, trace=False)}
    assert small["aopd"].peak > 40 * GIB and any("teacher.engine=server" in note for note in small["aopd"].notes)
    unchecked = {s.name: s for s in plan_experiment(plan_pipeline(["experiment=paper_8b_3k",
                                                                   "train.activation_checkpointing=false"]), 8, 80,
                                                    trace=False)}
    assert unchecked["aopd"].peak > 80 * GIB
    assert any("train.activation_checkpointing=true" in note for note in unchecked["aopd"].notes)


@pytest.mark.slow
def test_plan_command_traces_every_training_stage_and_ends_with_a_verdict(tmp_path):
    result = run_aopd("plan", "experiment=paper_8b_1k", "--gpus", "8", cwd=tmp_path)
    assert result.returncode == 0 and "aopd: " not in result.stderr, result.stderr[-1500:]
    lines = result.stdout.splitlines()
    assert "80 GiB (assumed; --gpu-memory to change)" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("sft ", "opd ", "seqkd "))}
    assert all(row[1] != "-" and row[2] != "-" for row in rows.values())  # traced and estimated
    assert abs(float(rows["opd"][1]) - float(rows["opd"][2])) / float(rows["opd"][1]) < 0.15
    assert lines[-1].startswith("12 stages fit; tightest: ")
