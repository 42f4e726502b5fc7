"""The rollout engines by name (`rollout.engine`): `hf` runs in-process HF `generate`; `vllm` an in-process
vLLM engine, imported only when chosen.

    python -m pytest tests/test_engine.py -q -k rollout
"""

from __future__ import annotations

from aopd_cli.rollout.interface import Rollout


def make_rollout(engine: str, policy, rollout_cfg, batch_size: int = 256, *, frozen: bool = False,
                 start_asleep: bool = False) -> Rollout:
    """The engine `engine` sampling from `policy` (`batch_size`: sequences per HF generate call; vLLM:
    `frozen` weights that are never pushed again, an engine `start_asleep` so another can start beside it)."""
    if engine == "vllm":
        from aopd_cli.rollout.vllm import vllm_rollout

        return vllm_rollout(policy, rollout_cfg, frozen=frozen, start_asleep=start_asleep)
    from aopd_cli.rollout.hf import hf_rollout

    return hf_rollout(policy, batch_size)
