"""Running experiments: `aopd pipeline` (an experiment's stages, checkpoints passed along) and `aopd sweep` (a
grid times seeds of stages or pipelines, one parent run), here one after another or as Ray Jobs side by side
(`executors`, `ray_jobs`), and `aopd jobs` to watch and stop those (`watch`).
May import: config, stages, tracking, training (distributed), progress, metrics, errors.

    aopd sweep pipeline experiment=lab_smoke --param tau=-1,0
"""
