"""`aopd report`: the lab report (docs/lab.md and its PNGs) generated from the MLflow runs of a sweep of
`experiments/lab_full.yaml` over seeds (read by `lab_runs.py`), plus the ablation sweeps where they exist
(the newest finished sweeps of `experiments/ablation_{beta,topk,tau,location}.yaml` in the same store, or
the parents given). Nothing in it is typed by hand: rerun it after a new sweep and the tables, figures and
verdicts follow the runs.

    aopd report --parent RUN_ID --out docs/lab.md
"""

from __future__ import annotations

from pathlib import Path

from aopd_cli import metrics as names
from aopd_cli.errors import UserError
from aopd_cli.results.diagnosis import tau_section
from aopd_cli.results.lab_runs import (
    ABLATIONS,
    Sweep,
    ablation_finals,
    load_sweep,
    mean_std,
    rows_by_block,
    stage_seconds,
    table2_rows,
    wall_time,
)
from aopd_cli.results.stats import RULE


def fmt(values: list[float], sign: bool = False, seeds: bool = True) -> str:
    """Percent, mean ± std over seeds and each seed's value (`-` when no run logged it)."""
    mean, std = mean_std(values)
    if mean is None:
        return "-"
    value = "{:+.1f}" if sign else "{:.1f}"
    if len(values) == 1:  # one run has no spread to show
        return value.format(100 * mean) + " (1 run)"
    each = f" ({', '.join(value.format(100 * v) for v in values)})" if seeds else ""
    return f"{value.format(100 * mean)} ± {100 * std:.1f}{each}"


def table1(sweep: Sweep) -> str:
    k = 4
    lines = [f"| block | model | Pass@1 | Pass@{k} | greedy | seeds |", "|---|---|---|---|---|---|"]
    for block, methods in rows_by_block(sweep).items():
        for method, stage in methods.items():
            cells = [fmt(sweep.finals(stage, names.pass_at(names.MATH_AVG, kk))) for kk in (1, k)]
            cells.append(fmt(sweep.finals(stage, names.greedy(names.MATH_AVG))))
            lines.append(f"| {block} | {method} | " + " | ".join(cells) + f" | {len(sweep.runs(stage))} |")
    return "\n".join(lines)


def table2(sweep: Sweep) -> str:
    lines = ["| method | tool success | tool greedy | first call | math Pass@4 before | after | change |",
             "|---|---|---|---|---|---|---|"]
    for method, row in table2_rows(sweep).items():
        lines.append(f"| {method} | {fmt(row['success'])} | {fmt(row['greedy'])} | {fmt(row['first_call'])} | "
                     f"{fmt(row['before'])} | {fmt(row['after'])} | {fmt(row['change'], sign=True)} |")
    return "\n".join(lines)



# ---------------------------------------------------------------- the document
def _settings(sweep: Sweep) -> str:
    """What each kind of stage ran with, read back from the first seed's params (not from the YAML)."""
    first = next(iter(sweep.seeds.values()))
    keys = ["train.steps", "train.lr", "train.batch_size", "objective.top_k", "rollout.n", "rollout.max_new_tokens",
            "train.eval_every"]
    lines = ["| stage | kind | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for name, run in first.items():
        if run.data.tags.get("stage") in ("warmup", "distill", "continual") and not run.data.tags.get("reused_checkpoint"):
            lines.append(f"| {name} | {run.data.tags.get('stage')} | " + " | ".join(
                run.data.params.get(k, "") for k in keys) + " |")
    return "\n".join(lines)


def _eval_settings(sweep: Sweep) -> tuple[str, str, str]:
    """(samples per problem, temperature, how many test problems) as the eval runs logged them."""
    run = next((r for by_name in sweep.seeds.values() for r in by_name.values()
                if r.data.tags.get("stage") == "eval"), None)
    params = run.data.params if run else {}
    limit = params.get("eval.limit", "None")
    return params.get("eval.n", "?"), params.get("eval.temperature", "?"), "all" if limit == "None" else f"the first {limit}"


def write_report(*, tracking_uri: str | None, experiment: str = "aopd", parent: str | None = None,
                 ablation_parents: dict[str, str] | None = None, out: str | Path = "docs/lab.md",
                 figures: str | Path | None = None) -> Path:
    """Write the report `out` and its PNGs (default: a folder named like `out` without `.md`)."""
    from aopd_cli.results.claims import claims
    from aopd_cli.results.figures import (
        ablation_bars,
        advantage_histogram,
        pass_at_1_curves,
        table2_bars,
        training_curves,
    )
    from aopd_cli.tracking.store import connect, find_runs

    out = Path(out)
    fig_dir = Path(figures) if figures else out.with_suffix("")
    client, all_runs = connect(tracking_uri), find_runs(tracking_uri, experiment)
    sweep = load_sweep(all_runs, parent, "lab_full")
    if sweep is None:
        raise UserError(f"no finished sweep of lab_full in experiment {experiment!r}: run "
                        "`aopd sweep pipeline experiment=lab_full --seeds 3` first, or pass --parent")
    fig_dir.mkdir(parents=True, exist_ok=True)
    ablations = {}
    for name in ABLATIONS:
        found = load_sweep(all_runs, (ablation_parents or {}).get(name), name)
        if found is not None:
            ablations[name] = found
    pngs = pass_at_1_curves(client, sweep, fig_dir) + training_curves(client, sweep, fig_dir)
    pngs.append(advantage_histogram(client, sweep, fig_dir))
    if sweep.experiment.table2:
        pngs.append(table2_bars(sweep, fig_dir))
    for name, ablation in ablations.items():
        pngs += ablation_bars(client, name, ablation, fig_dir)
    link = {p.name: Path(p).relative_to(out.parent) if p.is_relative_to(out.parent) else p for p in pngs}
    seeds, commit = len(sweep.seeds), next(iter(next(iter(sweep.seeds.values())).values())).data.tags.get("git_commit")
    n, temperature, problems = _eval_settings(sweep)
    parts = [
        f"# The lab: {sweep.experiment.name}, {seeds} seeds", "",
        f"Generated by `aopd report --parent {sweep.parent.info.run_id}` from the MLflow runs of sweep "
        f"`{sweep.parent.data.tags.get('sweep_parent', '?')}` (git {str(commit)[:10]}); do not edit by hand, rerun it. "
        "Numbers are percentages, mean ± std over seeds, then each seed's value (the warm-ups are shared: the seeds vary the "
        f"distillation, continual and evaluation sampling). Pass@1 / Pass@4 from {n} samples per problem at "
        f"temperature {temperature} on {problems} held-out test problems; greedy is one greedy answer per problem. How the "
        "settings were chosen (on the development split), and what was tried: [lab-search.md](lab-search.md).", "",
        sweep.experiment.description, "",
        "## Table 1: math after distillation (paper Table 1)", "", table1(sweep), "",
    ]
    if sweep.experiment.table2:
        parts += ["## Table 2: continual learning on tools (paper Table 2)", "",
                  f"Tool success: per instruction, the share of its {n} sampled multi-turn episodes whose calls match "
                  "the whole golden sequence and that then answer, averaged over the test instructions "
                  "(greedy: one episode each). Math: average Pass@4 before and after the continual stage.", "",
                  table2(sweep), "", f"![Table 2]({link['table2_continual.png']})", ""]
    found = claims(sweep, client, ablations)
    parts += ["## Claims", "", RULE + " Differences are in points of Pass@1 on the held-out test problems (Pass@4 for the "
              "math kept through continual learning; tool success per instruction; entropy in nats), with their "
              "95% interval and each seed's value.", "", "| claim | the paper says | verdict |", "|---|---|---|"]
    parts += [f"| {c.key} | {c.statement} | **{c.verdict}** |" for c in found]
    parts += [f"| C6 ({name}) | not judged: no finished sweep; run `aopd sweep pipeline experiment={name} --seeds 3` | "
              "**not run** |" for name in ABLATIONS if name not in ablations] + [""]
    for claim in found:
        parts += [f"**{claim.key}** ({claim.statement}): **{claim.verdict}**", ""]
        parts += [f"- {part.line()}" for part in claim.parts] + [""]
    if "ablation_tau" in ablations:
        parts += tau_section(client, ablations["ablation_tau"], fig_dir, out)
    parts += ["## Figures", ""] + [f"![{name}]({path})" for name, path in link.items()
                                   if not name.startswith(("ablation", "table2"))] + [""]
    if ablations:
        parts += ["## Ablations (paper Sec. 6.4)", ""]
        for name, ablation in ablations.items():
            parts += [f"### {name} ({len(ablation.seeds)} seeds)", "", "| setting | Pass@1 | greedy |", "|---|---|---|"]
            parts += [f"| {label} | {fmt(p)} | {fmt(g)} |" for label, p, g in ablation_finals(ablation)]
            parts += [""] + [f"![{n}]({path})" for n, path in link.items() if n.startswith(name)] + [""]
    parts += ["## Settings (as the runs logged them)", "", _settings(sweep), "",
              "## Wall time", "", f"Sweep: {wall_time(sweep) / 60:.1f} min for {seeds} seeds (warm-ups trained once).", "",
              "| stage | mean seconds per seed |", "|---|---|"]
    cached = {name for by_name in sweep.seeds.values() for name, run in by_name.items()
              if run.data.tags.get("reused_checkpoint")}
    parts += [f"| {name} | {'cached (trained once, before)' if name in cached else f'{seconds:.0f}'} |"
              for name, seconds in stage_seconds(sweep).items()]
    out.write_text("\n".join(parts) + "\n")
    return out
