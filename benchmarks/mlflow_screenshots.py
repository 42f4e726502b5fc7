"""The README's screenshots of MLflow's UI, from a real browser: the runs table of the latest sweep (or
pipeline) in a store, runs named by method and swept value with param and metric columns, and the
compare-runs page of its distillation runs. A copy of the store is served by `mlflow ui` on loopback and
photographed by headless Chromium (Debian's `chromium`), driven by playwright-core from npm (installed on
first use under ~/.cache/aopd/playwright; the browser steps are in benchmarks/mlflow_screenshots.js).
The runs table opens as aopd's closing link opens it: a shared view of the experiment (runs_view.runs_view).

    python benchmarks/mlflow_screenshots.py --store mlflow.db   # writes docs/mlflow-runs.png, docs/mlflow-compare.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aopd_cli import metrics as names  # noqa: E402 - after the path that finds it when run from anywhere
from aopd_cli.tracking.runs_view import UI_VIEW, runs_view
from aopd_cli.tracking.store import connect, find_runs

PLAYWRIGHT = Path.home() / ".cache" / "aopd" / "playwright"
PLAYWRIGHT_VERSION = "1.65.1"


def runs_table(client, uri: str, experiment: str) -> tuple[str, list]:
    """The runs table aopd's closing link opens (the experiment's shared view, written at the end of the
    last stage, pipeline or sweep): its URL fragment and its runs. A store from before those links gets one
    here, on the latest sweep (or pipeline), with the same kind of columns."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"no experiment {experiment!r} in {uri}")
    view = found.tags.get(f"mlflow.sharedViewState.{UI_VIEW}")
    if view is not None:
        search = json.loads(view)["searchFilter"]
        fragment = f"#/experiments/{found.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={UI_VIEW}"
        return fragment, find_runs(uri, experiment, search)
    runs = find_runs(uri, experiment)
    sweeps = [r for r in runs if r.data.tags.get("stage") == "sweep"]
    pipelines = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    if sweeps:
        search = f"tags.sweep_id = '{sweeps[-1].data.tags['sweep_parent']}' and tags.stage != 'pipeline'"
    elif pipelines:
        search = f"tags.`mlflow.parentRunId` = '{pipelines[-1].info.run_id}'"
    else:
        raise SystemExit(f"no sweep or pipeline in experiment {experiment!r} of {uri}")
    runs = find_runs(uri, experiment, search)
    swept = sorted({k for r in runs for k in r.data.tags if k.startswith("sweep.") and k != "sweep.seed"})
    keys = {key for run in runs for key in run.data.metrics}
    metrics = ([names.pass_at(b, 1) for b in names.math_benchmarks(keys)]
               + [names.tool(b, "success") for b in names.tool_benchmarks(keys)] + [names.train("loss")])
    columns = ([f"tags.`{k}`" for k in ["objective", *swept]] + ([] if swept else ["params.`objective.tau`"])
               + [f"metrics.`{k}`" for k in metrics])
    return runs_view(client, experiment, columns, search), runs


def compared(runs: list, wanted: list[str], limit: int = 3) -> list:
    """The runs to compare: those named, else the distillation runs of the objective that has the most
    (one per swept value), then one run of each other objective."""
    by_name = {r.info.run_name: r for r in runs}
    if wanted:
        missing = [name for name in wanted if name not in by_name]
        if missing:
            raise SystemExit(f"no run named {missing[0]!r}; runs: {', '.join(sorted(by_name))}")
        return [by_name[name] for name in wanted]
    groups: dict[str, list] = {}
    for run in sorted((r for r in runs if r.data.tags.get("stage") == "distill"), key=lambda r: r.info.run_name):
        groups.setdefault(run.data.tags.get("objective", ""), []).append(run)
    ordered = sorted(groups.values(), key=len, reverse=True)
    return (ordered[0] + [group[-1] for group in ordered[1:]])[:limit] if ordered else []


@contextmanager
def mlflow_ui(store: Path):
    """`mlflow ui` on a free loopback port (its own process group, stopped however the block ends)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{store}",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=store.parent,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("mlflow ui did not start") from None
                time.sleep(1)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def node_modules() -> Path:
    if not (PLAYWRIGHT / "node_modules" / "playwright-core").is_dir():
        subprocess.run(["npm", "install", "--prefix", str(PLAYWRIGHT), "--no-audit", "--no-fund",
                        f"playwright-core@{PLAYWRIGHT_VERSION}"], check=True, stdout=subprocess.DEVNULL)
    return PLAYWRIGHT / "node_modules"


def shrink(png: Path) -> None:
    """256 colours: a UI screenshot stays legible at a third of the size."""
    from PIL import Image

    Image.open(png).convert("RGB").quantize(256).save(png, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("mlflow.db"), help="the SQLite store (only read: a copy is served)")
    parser.add_argument("--experiment", default="aopd")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--compare", nargs="*", default=[], help="run names for the compare page (default: chosen)")
    parser.add_argument("--size", default="1600x1000", help="the browser window, WIDTHxHEIGHT")
    parser.add_argument("--compare-height", type=int, default=1900)
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("no chromium on PATH: apt-get install -y chromium")
    width, height = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "mlflow.db"
        shutil.copy2(args.store, store)
        uri = f"sqlite:///{store}"
        fragment, runs = runs_table(connect(uri), uri, args.experiment)
        chosen = compared(runs, args.compare)
        if not chosen:
            raise SystemExit("no distillation run to compare: name some with --compare")
        # the compare page's plot: the objective and the swept values against the first Pass@1 and the loss
        swept = {k.removeprefix("sweep.") for r in chosen for k in r.data.tags if k.startswith("sweep.")} - {"seed"}
        params = list(dict.fromkeys(["objective.name", "objective.tau", *sorted(swept)]))[:3]
        benches = names.math_benchmarks({key for run in chosen for key in run.data.metrics})
        metrics = [names.pass_at(b, 1) for b in benches[:1]] + [names.train("loss")]
        query = urllib.parse.urlencode({"runs": json.dumps([r.info.run_id for r in chosen]),
                                        "experiments": json.dumps([fragment.split("/")[2]]),
                                        "workflowType": "machine_learning"})
        args.out.mkdir(parents=True, exist_ok=True)
        with mlflow_ui(store) as base:
            spec = {"chromium": chromium, "width": width, "height": height, "compare_height": args.compare_height,
                    "runs_url": f"{base}/{fragment}", "first_run": sorted(r.info.run_name for r in runs)[0],
                    "runs_png": str(args.out / "mlflow-runs.png"), "compare_url": f"{base}/#/compare-runs?{query}",
                    "compare_png": str(args.out / "mlflow-compare.png"), "params": params, "metrics": metrics}
            subprocess.run(["node", str(Path(__file__).with_suffix(".js")), json.dumps(spec)], check=True,
                           env={**os.environ, "NODE_PATH": str(node_modules())})
    for png in (args.out / "mlflow-runs.png", args.out / "mlflow-compare.png"):
        shrink(png)
        print(f"{png} ({png.stat().st_size // 1024} KB)")
    print(f"runs table: {len(runs)} runs; compared: {', '.join(r.info.run_name for r in chosen)}")


if __name__ == "__main__":
    main()
