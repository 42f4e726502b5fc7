"""The lab report's verdict rules (report_claims): numbers that tie or fall short never read "reproduced"."""

from types import SimpleNamespace

from aopd_cli import metrics as names
from aopd_cli.results.claims import _c6, claims
from aopd_cli.results.lab_runs import Sweep
from aopd_cli.results.report import fmt

PASS1, PASS4 = names.pass_at(names.MATH_AVG, 1), names.pass_at(names.MATH_AVG, 4)


def run(**metrics):
    return SimpleNamespace(data=SimpleNamespace(metrics=metrics, tags={}, params={}), info=SimpleNamespace())


def sweep(table1=None, table2=None, seeds=None):
    experiment = SimpleNamespace(table1=table1 or {}, table2=table2 or {}, stages=[])
    return Sweep(experiment, parent=None, seeds=seeds or {})


def beta_ablation(values):
    table1 = {f"objective.beta={b}": f"eval_{i}" for i, b in enumerate((0, 0.5, 0.9, 1))}
    seeds = {str(s): {f"eval_{i}": run(**{PASS1: v}) for i, v in enumerate(values)} for s in range(3)}
    return sweep(table1=table1, seeds=seeds)


def test_a_flat_beta_ablation_is_not_a_rise_and_a_rising_one_is():
    assert "**not reproduced**" in _c6({"ablation_beta": beta_ablation([0.312, 0.304, 0.294, 0.313])})
    assert "**reproduced**" in _c6({"ablation_beta": beta_ablation([0.20, 0.24, 0.28, 0.31])})
    assert "no ablation sweep" in _c6({})


def test_continual_without_losses_does_not_reproduce_opd_losing_most():
    def seeds(opd_after, aopd_after):
        tools = "eval/lab_tools/success"
        return {str(s): {"before_opd": run(**{PASS4: 0.9}), "after_opd": run(**{PASS4: opd_after, tools: 0.5}),
                         "before_aopd": run(**{PASS4: 0.9}), "after_aopd": run(**{PASS4: aopd_after, tools: 0.5})}
                for s in range(3)}

    table2 = {"OPD": ("before_opd", "after_opd"), "AOPD": ("before_aopd", "after_aopd")}
    flat = claims(sweep(table2=table2, seeds=seeds(0.9, 0.9)), client=None, ablations={})
    c4 = next(line for line in flat if line.startswith("**C4**"))
    assert "**partly**" in c4  # AOPD keeps its math and both learn tools, but OPD lost nothing
    paper = claims(sweep(table2=table2, seeds=seeds(0.5, 0.9)), client=None, ablations={})
    assert "**reproduced**" in next(line for line in paper if line.startswith("**C4**"))


def test_one_run_shows_no_spread():
    assert fmt([0.5]) == "50.0 (1 run)" and fmt([0.5, 0.7]) == "60.0 ± 14.1" and fmt([]) == "-"
