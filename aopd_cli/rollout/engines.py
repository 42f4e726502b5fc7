"""The rollout engines by name (`rollout.engine`): `hf` runs in-process HF `generate`; `vllm` an in-process
vLLM engine, imported only when chosen. `one_at_a_time` shares a process between engines that must never
be alive together (SeqKD's teacher sampler and its student evaluations on vLLM).

    python -m pytest tests/test_engine.py -q -k rollout
"""

from __future__ import annotations

from typing import Callable

from aopd_cli.rollout.interface import Rollout


def make_rollout(engine: str, policy, rollout_cfg, batch_size: int = 256, *, frozen: bool = False) -> Rollout:
    """The engine `engine` sampling from `policy` (`batch_size`: sequences per HF generate call; vLLM:
    `frozen` weights that are never pushed again, so it sleeps keeping them)."""
    if engine == "vllm":
        from aopd_cli.rollout.vllm import vllm_rollout

        return vllm_rollout(policy, rollout_cfg, frozen=frozen)
    from aopd_cli.rollout.hf import hf_rollout

    return hf_rollout(policy, batch_size)


def one_at_a_time(*makers: Callable[[], Rollout]) -> list[Rollout]:
    """One rollout per maker, of which at most one engine is alive at any time: using one closes the
    live one first, then starts its own. vLLM's sleep mode keeps one memory pool per process and its
    `sleep` / `wake_up` act on every engine's memory in it (vLLM 0.33 refuses a second engine's pool
    outright), so two engines in one process cannot take turns asleep. A started engine is given its
    policy's current weights; `sync_weights` of one that is not alive has nothing to do."""
    live: dict = {"index": None, "rollout": None}

    def close_live() -> None:
        if live["rollout"] is not None:
            rollout, live["rollout"], live["index"] = live["rollout"], None, None
            rollout.close()

    def view(index: int) -> Rollout:
        def alive() -> Rollout:
            if live["index"] != index:
                close_live()
                live["rollout"], live["index"] = makers[index](), index
            return live["rollout"]

        def sync_weights() -> None:
            if live["index"] == index:
                live["rollout"].sync_weights()

        def close() -> None:
            if live["index"] == index:
                close_live()

        return Rollout(lambda *args, **kwargs: alive().generate(*args, **kwargs), sync_weights, close)

    return [view(index) for index in range(len(makers))]
