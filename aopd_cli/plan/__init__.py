"""Planning: the peak memory per GPU of each stage of an experiment (`aopd plan`), from the model shapes.
May import: config, training (the objective table), errors.

    aopd plan experiment=paper_8b_3k --gpus 8 --gpu-memory 80
"""
