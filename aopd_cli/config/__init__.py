"""Configuration: pydantic models (schema.py) and Hydra composition (compose.py).

    aopd show distill
"""
