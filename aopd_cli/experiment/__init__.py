"""Running experiments: `aopd pipeline` (an experiment's stages in order, checkpoints passed along) and
`aopd sweep` (a grid times seeds of stages or pipelines, one parent run).
May import: config, stages, tracking, training (distributed), progress, metrics, errors.

    aopd sweep pipeline experiment=lab_smoke --param tau=-1,0
"""
