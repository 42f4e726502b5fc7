"""Data: loaders for the real datasets, chat formatting and prompt builders, the lab's generator.

    python -m pytest tests/test_data.py -q
"""

from aopd_cli.data.loaders import load_data, load_records

__all__ = ["load_data", "load_records"]
