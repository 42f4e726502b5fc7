"""The training engine: processes and FSDP2 (distributed), models (loading, dtypes, checks), the pure-torch
objectives and the chunked LM head, the update step, micro-batching, the step loop, checkpoints, signals.
May import: errors, metrics, progress, config, data. Knows nothing of stages, teachers or tracking.

    python -m pytest tests/test_engine.py tests/test_objectives.py -q
"""
