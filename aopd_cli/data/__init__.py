"""Data: loaders for the real datasets (normalised records), chat formatting and prompt builders, and the
lab's deterministic data generator and tokenizer.
May import: errors. Imported by training (the lab tokenizer), eval, stages and config (dataset names).

    python -m pytest tests/test_data.py -q
"""
