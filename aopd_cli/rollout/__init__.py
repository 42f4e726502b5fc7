"""Rollouts: one small interface (`interface.py`), engines by name (`engines.py`): HF generate in-process
(`hf.py`) and an in-process vLLM engine fed the trainer's weights (`vllm.py`, `vllm_engine.py`).
May import: errors, progress, training (distributed).

    python -m pytest tests/test_engine.py -q -k rollout
"""
