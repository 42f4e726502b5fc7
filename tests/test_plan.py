"""`aopd plan`: model shapes and the memory estimate of the paper's experiments on 8 GPUs."""

import pytest
from helpers import run_aopd

from aopd_cli.experiment.pipeline import plan_pipeline
from aopd_cli.plan.estimate import GIB, QWEN3, Shape, plan_experiment, render


def test_known_shapes_give_the_published_parameter_counts():
    counts = {name: Shape(*shape).params / 1e9 for name, shape in QWEN3.items()}
    assert counts["Qwen/Qwen3-8B"] == pytest.approx(8.19, abs=0.01)
    assert counts["Qwen/Qwen3-32B"] == pytest.approx(32.76, abs=0.01)
    assert counts["Qwen/Qwen3-4B"] == pytest.approx(4.02, abs=0.01)


def test_the_paper_recipes_fit_on_8_x_80_gb_and_say_why_not_on_smaller_gpus():
    plan = plan_pipeline(["experiment=paper_8b_3k"])
    stages = {s.name: s for s in plan_experiment(plan, 8, 80)}
    assert all(s.peak <= 80 * GIB for s in stages.values()), render(list(stages.values()), 8, 80)
    assert stages["aopd"].parts["student states (fp32 params, grads, AdamW; sharded)"] == pytest.approx(16 * 8.19e9 / 8,
                                                                                                         rel=0.01)
    small = {s.name: s for s in plan_experiment(plan, 8, 40)}
    assert small["aopd"].peak > 40 * GIB and any("teacher.engine=server" in note for note in small["aopd"].notes)
    unchecked = {s.name: s for s in plan_experiment(plan_pipeline(["experiment=paper_8b_3k",
                                                                   "train.activation_checkpointing=false"]), 8, 80)}
    assert unchecked["aopd"].peak > 80 * GIB
    assert any("train.activation_checkpointing=true" in note for note in unchecked["aopd"].notes)


def test_plan_command(tmp_path):
    result = run_aopd("plan", "experiment=paper_8b_3k", "--gpus", "8", "--gpu-memory", "80", cwd=tmp_path)
    assert result.returncode == 0 and "aopd: " not in result.stderr
    assert "sft:" in result.stdout and "fits" in result.stdout and "vLLM engine" in result.stdout
