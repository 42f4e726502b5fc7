"""Graders: math answers (math-verify), pass@k, ToolAlpaca tool calls.

    python -m pytest tests/test_graders.py -q
"""

from aopd_cli.eval.math import extract_boxed, grade_math, pass_at_k
from aopd_cli.eval.tools import ToolGrade, grade_tool_calls, grade_turn, parse_tool_calls

__all__ = ["extract_boxed", "grade_math", "pass_at_k", "ToolGrade", "grade_tool_calls", "grade_turn", "parse_tool_calls"]
