"""Results from the MLflow store: `aopd compare` (tables and plots across runs) and `aopd report` (the lab
report: its runs as data, verdicts on the paper's claims, figures).
May import: config, tracking, metrics, errors.

    aopd compare --out outputs/compare
"""
