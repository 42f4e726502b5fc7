"""Grading speed: math-verify responses per second on 1,000 varied responses, and tool-call grades.

    python benchmarks/grading.py
"""

import random
import time

from aopd_cli.eval.math import grade_math
from aopd_cli.eval.tools import grade_tool_calls

rng = random.Random(0)
TEMPLATES = [
    ("After some work, the answer is \\boxed{{{a}}}.", "{a}"),
    ("We get $\\frac{{{a}}}{{{b}}}$, so \\boxed{{\\dfrac{{{a}}}{{{b}}}}}", "\\frac{{{a}}}{{{b}}}"),
    ("Thus x = {a}.{b} and finally \\boxed{{{a}.{b}}}", "{a}.{b}"),
    ("The result is \\boxed{{{a}\\sqrt{{{b}}}}}.", "{a}\\sqrt{{{b}}}"),
    ("I am not sure, maybe {a}?", "{b}"),
    ("\\boxed{{{a}}} no wait \\boxed{{{b}}}", "{b}"),
    ("<think>\nlong reasoning {a} {b}\n</think>\n\n\\boxed{{({a}, {b})}}", "({a}, {b})"),
    ("so the value is \\boxed{{{a}^{{{b}}}}}", "{a}^{{{b}}}"),
]
cases = []
for _ in range(1000):
    response, gold = rng.choice(TEMPLATES)
    a, b = rng.randint(1, 99), rng.randint(2, 9)
    cases.append((response.format(a=a, b=b), gold.format(a=a, b=b)))
started = time.perf_counter()
correct = sum(grade_math(r, g) for r, g in cases)
elapsed = time.perf_counter() - started
print(f"math: {len(cases)} responses in {elapsed:.2f} s = {len(cases) / elapsed:.0f} responses/s ({correct} correct)")

golden = [{"action": "getWeather", "action_input": '{"city": "paris"}'},
          {"action": "getForecast", "action_input": '{"city": ${city}, "days": 3}'}]
tool_cases = ['Action: getWeather\nAction Input: {"city": "Paris"}\nAction: getForecast\nAction Input: {"city": "x", "days": 3}',
              "nothing here", 'ASSISTANT Action: getWeather\nASSISTANT Action Input: {"city": "rome"}'] * 334
started = time.perf_counter()
success = sum(grade_tool_calls(r, golden).success for r in tool_cases)
elapsed = time.perf_counter() - started
print(f"tools: {len(tool_cases)} responses in {elapsed:.3f} s = {len(tool_cases) / elapsed:.0f} responses/s ({success} successes)")
