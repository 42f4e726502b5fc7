"""Evaluation: math grading (math-verify) and pass@k (`math.py`), ToolAlpaca tool-call grading (`tools.py`),
and running benchmarks on a rollout engine (`harness.py`).
May import: errors, metrics, data, training (distributed).

    python -m pytest tests/test_graders.py -q
"""
