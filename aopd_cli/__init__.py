"""aopd: Asymmetric On-Policy Distillation and its baselines, from a CPU lab to GPU clusters.

    aopd --help
"""

__version__ = "0.1.0"
