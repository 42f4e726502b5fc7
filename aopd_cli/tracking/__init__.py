"""Tracking: a small tracker interface with MLflow behind it (`tracker.py`, backlog through outages), the
MLflow store (`store.py`: connect, runs) and the runs-table link (`runs_view.py`). MLflow is imported here only.
May import: errors, metrics.

    python -m pytest tests/test_tracking.py -q
"""
