"""The stages: warmup, distill, continual, eval (one readable function each; `onpolicy.py` is the loop distill
and continual share), the checks before any work (`preflight.py`), the run lifecycle and `run_stage`.
May import: config, data, training, rollout, teacher, eval, tracking; results (a run's advantage histogram);
plan (model shapes: a teacher server that cannot fit beside the trainer is refused before any work).

    aopd pipeline experiment=lab_smoke
"""
