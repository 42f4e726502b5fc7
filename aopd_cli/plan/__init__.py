"""Planning: the peak memory per GPU of each stage of an experiment (`aopd plan`), traced on fake tensors
(`trace.py`) and by arithmetic (`estimate.py`) from the model shapes (`shapes.py`), phase by phase (`planner.py`).
May import: config, training (the objective table, the step it traces), teacher (the HF scorer it traces), errors.

    aopd plan experiment=paper_8b_3k --gpus 8 --gpu-memory 80
"""
