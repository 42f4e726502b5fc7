"""The lab report's verdicts on the paper's claims, judged as the paper states them. Every part of a claim
is a paired difference with a 95% interval (results/stats.py: a bootstrap over problems and seeds), in
Pass@1 on the held-out test split (the paper's metric), Pass@4 for the math kept through continual
learning, tool success per instruction, and for the training curves the mean over steps. A claim about
AOPD is judged on its AOPD parts only; what the paper says of the baselines is a claim of its own.

    aopd report --parent RUN_ID --out docs/lab.md
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from aopd_cli import metrics as names
from aopd_cli.results.lab_runs import MATH_BENCH, Sweep, rows_by_block, training_stages
from aopd_cli.results.problems import Problems, by_seed
from aopd_cli.results.stats import Diff, claim_verdict, mean_difference, part_state, series_difference

TOOLS_BENCH = "lab_tools"
OTHERS = ("SeqKD", "OPD", "ExOPD", "GKD")


@dataclass
class Part:
    text: str  # what the paper says, as a difference: "AOPD - OPD, final Pass@1 > 0"
    diff: Diff | None
    direction: int  # +1: the claim says the difference is positive
    unit: str = "pt"
    scale: float = 100.0

    @property
    def state(self) -> str:
        return part_state(self.diff, self.direction)

    def line(self) -> str:
        digits = 1 if self.scale == 100.0 else 3
        value = self.diff.fmt(self.scale, digits) if self.diff else "no data"
        seeds = ", ".join(f"{self.scale * v:+.{digits}f}" for v in self.diff.per_seed) if self.diff else ""
        return f"{self.text}: {value} {self.unit} (per seed {seeds}): **{self.state}**"


@dataclass
class Claim:
    key: str
    statement: str
    parts: list[Part] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return claim_verdict([part.state for part in self.parts])


class Evidence:
    """The per-seed, per-problem numbers the parts compare, read once."""

    def __init__(self, sweep: Sweep, problems: Problems):
        self.sweep, self.problems = sweep, problems

    def final(self, stage: str, k: int = 1) -> dict:
        return by_seed(self.sweep, stage, lambda run: self.problems.math(run, MATH_BENCH, k))

    def tools(self, stage: str) -> dict:
        return by_seed(self.sweep, stage, lambda run: self.problems.tools(run, TOOLS_BENCH))

    def curve(self, stage: str) -> dict[str, dict[int, dict[str, float]]]:
        return by_seed(self.sweep, stage, lambda run: self.problems.curve(run, MATH_BENCH))

    def early_minus_start(self, stage: str) -> Diff | None:
        """Mean Pass@1 over the curve's first half (its evaluations after step 0) - Pass@1 at step 0."""
        early, start = {}, {}
        for seed, by_step in self.curve(stage).items():
            steps = [s for s in by_step if 0 < s <= max(by_step) / 2]
            if 0 in by_step and steps:
                start[seed] = by_step[0]
                early[seed] = {p: statistics.fmean(by_step[s][p] for s in steps if p in by_step[s])
                               for p in by_step[0] if all(p in by_step[s] for s in steps)}
        return mean_difference(early, start)

    def series(self, client, stage: str, key: str) -> dict[str, list[float]]:
        from aopd_cli.tracking.store import metric_history

        return {seed: [v for _, v in metric_history(client, by_name[stage].info.run_id, key)]
                for seed, by_name in self.sweep.seeds.items() if stage in by_name}


def _change(evidence: Evidence, before: str, after: str, k: int = 4) -> dict:
    """{seed: {problem: Pass@k after - before}} through the continual stage."""
    b, a = evidence.final(before, k), evidence.final(after, k)
    return {s: {p: a[s][p] - b[s][p] for p in a[s] if p in b[s]} for s in a if s in b}


def block_claims(evidence: Evidence, block: str, key: str) -> list[Claim]:
    rows, trained = rows_by_block(evidence.sweep).get(block, {}), training_stages(evidence.sweep, block)
    sft = next((stage for method, stage in rows.items() if "SFT" in method), None)
    if sft is None or "AOPD" not in rows:
        return []
    start, aopd = evidence.final(sft), evidence.final(rows["AOPD"])
    others = [m for m in OTHERS if m in rows]
    ends_above = [Part(f"AOPD - {m}, final Pass@1", mean_difference(aopd, evidence.final(rows[m])), +1)
                  for m in others]
    improves = Part("AOPD final - warm-up start, Pass@1", mean_difference(aopd, start), +1)
    if block == "weak":
        claims = [Claim(f"{key} (AOPD)", "weak warm-up: AOPD improves steadily and ends best",
                        [improves, Part("AOPD first half - start of its curve, Pass@1",
                                        evidence.early_minus_start(trained["AOPD"]), +1) if "AOPD" in trained
                         else None, *ends_above]),
                  Claim(f"{key} (baselines)", "weak warm-up: OPD and ExOPD degrade early",
                        [Part(f"{m} first half - start of its curve, Pass@1", evidence.early_minus_start(trained[m]), -1)
                         for m in ("OPD", "ExOPD") if m in trained])]
    else:
        claims = [Claim(f"{key} (AOPD)", "strong warm-up: AOPD improves and ends best", [improves, *ends_above]),
                  Claim(f"{key} (baselines)", "strong warm-up: every on-policy baseline improves",
                        [Part(f"{m} final - warm-up start, Pass@1", mean_difference(evidence.final(rows[m]), start), +1)
                         for m in ("OPD", "ExOPD", "GKD") if m in rows])]
    for claim in claims:
        claim.parts = [part for part in claim.parts if part is not None]
    return claims


def seqkd_claim(evidence: Evidence) -> Claim | None:
    parts = []
    for block, rows in rows_by_block(evidence.sweep).items():
        sft = next((stage for method, stage in rows.items() if "SFT" in method), None)
        if sft and "SeqKD" in rows:
            parts.append(Part(f"{block}: SeqKD final - warm-up start, Pass@1",
                              mean_difference(evidence.final(rows["SeqKD"]), evidence.final(sft)), -1))
    return Claim("C3", "SeqKD falls below its start", parts) if parts else None


def continual_claims(evidence: Evidence) -> list[Claim]:
    table = evidence.sweep.experiment.table2
    if "AOPD" not in table:
        return []
    change = {method: _change(evidence, before, after) for method, (before, after) in table.items()}
    success = {method: evidence.tools(after) for method, (_, after) in table.items()}
    aopd = [Part("AOPD's math Pass@4, after - before", mean_difference(change["AOPD"]), +1),
            Part("AOPD tool success", mean_difference(success["AOPD"]), +1)]
    if "OPD" in change:
        aopd.insert(1, Part("AOPD's math change - OPD's, Pass@4", mean_difference(change["AOPD"], change["OPD"]), +1))
    baselines = [Part(f"OPD's math change - {m}'s, Pass@4", mean_difference(change["OPD"], change[m]), -1)
                 for m in change if m not in ("OPD", "AOPD") and "OPD" in change]
    baselines += [Part(f"{m} tool success", mean_difference(success[m]), +1) for m in success if m != "AOPD"]
    return [Claim("C4 (AOPD)", "after continual learning on tools AOPD keeps its math, loses less than OPD, and "
                  "learns the tools", aopd),
            Claim("C4 (baselines)", "OPD loses the most math; every method learns the tools", baselines)]


def dynamics_claim(evidence: Evidence, client) -> Claim | None:
    parts = []
    for block in ("weak", "strong"):
        trained = training_stages(evidence.sweep, block)
        if "AOPD" in trained and "OPD" in trained:
            entropy = names.train("entropy")
            parts.append(Part(f"{block}: AOPD - OPD mean entropy", series_difference(
                evidence.series(client, trained["AOPD"], entropy), evidence.series(client, trained["OPD"], entropy)),
                +1, "nats", 1.0))
            ratio = evidence.series(client, trained["AOPD"], names.train("intervention_ratio"))
            quarters = {seed: values for seed, values in ratio.items() if len(values) >= 8}
            last = {s: v[-len(v) // 4:] for s, v in quarters.items()}
            first = {s: v[:len(v) // 4] for s, v in quarters.items()}
            parts.append(Part(f"{block}: AOPD intervention ratio, last quarter - first", series_difference(last, first),
                              -1, "pt"))
    return Claim("C5 (AOPD)", "AOPD keeps a higher entropy than OPD, and its intervention ratio falls",
                 parts) if parts else None


def _setting(ablation: Sweep, problems: Problems, setting: str):
    """{seed: {problem: Pass@1}} of the ablation's setting `setting` (a table1 label, `objective.` left out)."""
    stage = next((s for label, s in ablation.experiment.table1.items() if label.removeprefix("objective.") == setting),
                 None)
    return by_seed(ablation, stage, lambda run: problems.math(run, MATH_BENCH)) if stage else {}


def ablation_claims(ablations: dict[str, Sweep], problems: Problems) -> list[Claim]:
    claims = []

    def compare(name, text, a, b, direction=+1):
        sweep = ablations[name]
        return Part(text, mean_difference(_setting(sweep, problems, a), _setting(sweep, problems, b)), direction)

    if "ablation_beta" in ablations:
        claims.append(Claim("C6 beta", "Pass@1 is highest at beta = 1 (forward KL), rising toward it",
                            [compare("ablation_beta", f"beta=1 - beta={b}", "beta=1", f"beta={b}") for b in
                             ("0", "0.5", "0.9")]))
    if "ablation_topk" in ablations:
        claims.append(Claim("C6 top-K", "final Pass@1 improves as K grows from 8 to 16 to 32",
                            [compare("ablation_topk", "K=16 - K=8", "top_k=16", "top_k=8"),
                             compare("ablation_topk", "K=32 - K=16", "top_k=32", "top_k=16")]))
    if "ablation_location" in ablations:
        claims.append(Claim("C6 location", "tau = 0 intervenes best; AOPD-Zero beats tau = -0.2",
                            [compare("ablation_location", f"tau=0 - {other}", "tau=0", other)
                             for other in ("tau=-0.2", "intervention=accuracy", "intervention=zero")]
                            + [compare("ablation_location", "zero - tau=-0.2", "intervention=zero", "tau=-0.2")]))
    if "ablation_tau" in ablations:
        claims.append(Claim("C6 tau", "even sparse intervention (tau = -0.2) beats OPD (tau = -1); tau = 0 is best",
                            [compare("ablation_tau", "tau=-0.2 - tau=-1 (OPD)", "tau=-0.2", "tau=-1")]
                            + [compare("ablation_tau", f"tau=0 - tau={t}", "tau=0", f"tau={t}")
                               for t in ("-1", "-0.2", "0.2", "1")]))
    return claims


def claims(sweep: Sweep, client, ablations: dict[str, Sweep]) -> list[Claim]:
    problems = Problems(client)
    evidence = Evidence(sweep, problems)
    found = block_claims(evidence, "weak", "C1") + block_claims(evidence, "strong", "C2")
    found += [claim for claim in (seqkd_claim(evidence),) if claim] + continual_claims(evidence)
    found += [claim for claim in (dynamics_claim(evidence, client),) if claim]
    return found + ablation_claims(ablations, problems)
