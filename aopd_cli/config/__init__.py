"""Configuration: the frozen pydantic schema, composition of `recipes/` with Hydra (the only Hydra import),
which keys name local paths, and how a config is shown (`aopd show`, `aopd ls`).
May import: errors, and data (known dataset names) lazily. Imported by every other package.

    aopd show distill objective=aopd objective.tau=0.5
"""
