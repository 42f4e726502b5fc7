"""The quick lab (`aopd pipeline`, experiments/lab.yaml) from an empty cache, as `make lab` runs it (the local
executor, torch's threads) and on Ray (`--executor ray threads=1`: each stage one CPU, independent stages side
by side), in interleaved rounds, each run in a folder and cache of its own. Prints each run's wall time, the
ray/local ratio of each round and their median, the load before each run, and whether the two printed the
same tables (one thread or two: float sums in another order can move a sampled answer).

    python benchmarks/executors.py --rounds 1
    python benchmarks/executors.py --experiment lab_smoke --rounds 3   # a quick look
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(executor: str, experiment: str, work: Path) -> tuple[float, str, str]:
    """(wall seconds, the comparison's tables, the load before) of one pipeline from an empty cache."""
    work.mkdir(parents=True)
    load = open("/proc/loadavg").read().split()[0]
    env = {**os.environ, "AOPD_CACHE": str(work / "cache")}
    command = [sys.executable, "-m", "aopd_cli.cli", "pipeline", f"experiment={experiment}",
               f"tracking.uri=sqlite:///{work}/mlflow.db"] + (["--executor", "ray", "threads=1"] if executor == "ray"
                                                               else [])
    started = time.perf_counter()
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"{executor} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    tables = result.stdout[result.stdout.index("## Table 1"):result.stdout.index("## Wall time")]
    return seconds, tables, load


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiment", default="lab")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="aopd-executors-") as root:
        for number in range(args.rounds):
            runs = {}
            # the order alternates: neither executor always runs on the machine as the other left it
            for executor in (("local", "ray") if number % 2 == 0 else ("ray", "local")):
                runs[executor] = run(executor, args.experiment, Path(root) / f"{number}-{executor}")
                print(f"round {number + 1} {executor}: {runs[executor][0]:.1f} s (load before {runs[executor][2]})",
                      flush=True)
            rounds.append({executor: round(r[0], 1) for executor, r in runs.items()}
                          | {"ratio": round(runs["ray"][0] / runs["local"][0], 3),
                             "same tables": runs["ray"][1] == runs["local"][1]})
    print(json.dumps({"experiment": args.experiment, "rounds": rounds,
                      "median ratio (ray / local)": statistics.median(r["ratio"] for r in rounds),
                      "cpus": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
