"""The rollout engines by name (`rollout.engine`): `hf` runs in-process HF `generate`; `vllm` an in-process
vLLM engine, imported only when chosen.

    python -m pytest tests/test_engine.py -q -k rollout
"""

from __future__ import annotations

from aopd_cli.rollout.interface import Rollout


def make_rollout(engine: str, policy, rollout_cfg, batch_size: int = 256) -> Rollout:
    """The engine `engine` sampling from `policy` (`batch_size`: sequences per HF generate call)."""
    if engine == "vllm":
        from aopd_cli.rollout.vllm import vllm_rollout

        return vllm_rollout(policy, rollout_cfg)
    from aopd_cli.rollout.hf import hf_rollout

    return hf_rollout(policy, batch_size)
