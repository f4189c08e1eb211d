"""``%load_ext burst_jupyter`` with the three marketplaces configured (reconciliation starts at load) against the
same with none, measured in the same run.

    python bench/load.py [--runs 10] [--latency 1.0]

Each load runs in a fresh interpreter (IPython already imported, as in a kernel), timed around
``run_line_magic("load_ext", ...)`` only. With marketplaces, the three provider fakes (tests/fakes/) serve on
loopback and answer every request after ``--latency`` seconds, so a load that waited on the network would show it.
Median of ``--runs``, printed as a ratio to the load with no marketplace. Target: within 1.2x (the reconciliation
pass runs in a background thread; the load reads only config files and the state store).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fakes.runpod import FakeRunPod
from fakes.thunder import FakeThunder
from fakes.vast import FakeVast

LOAD = """
import time
from IPython.testing.globalipapp import start_ipython
ip = start_ipython()
t0 = time.perf_counter()
ip.run_line_magic("load_ext", "burst_jupyter")
print(f"{(time.perf_counter() - t0) * 1000:.3f}")
"""

ENV = {"vast": ("VAST_API_KEY", "VAST_URL"), "runpod": ("RUNPOD_API_KEY", "RUNPOD_API_BASE_URL"),
       "thunder": ("TNR_API_TOKEN", "TNR_API_URL")}


def load_ms(env: dict[str, str]) -> float:
    out = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--latency", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        clouds = {"vast": FakeVast(root / "clouds"), "runpod": FakeRunPod(root / "clouds"),
                  "thunder": FakeThunder(root / "clouds")}
        base = {k: v for k, v in os.environ.items() if k not in {name for pair in ENV.values() for name in pair}}
        base.update(BURST_HOME=str(root / "home"), BURST_CONFIG=str(root / "none.toml"))
        configured = dict(base)
        for name, cloud in clouds.items():
            cloud.switches.latency = args.latency
            server = stack.enter_context(cloud.serve())
            key_var, url_var = ENV[name]
            configured.update({key_var: cloud.api_key, url_var: server.url})
        load_ms(base)  # warm the file cache and the bytecode
        times: dict[str, list[float]] = {"no marketplace": [], "three marketplaces": []}
        for _ in range(args.runs):
            times["no marketplace"].append(load_ms(base))
            times["three marketplaces"].append(load_ms(configured))
        for cloud in clouds.values():
            cloud.close()
    baseline = statistics.median(times["no marketplace"])
    print(f"%load_ext, median of {args.runs} (fakes answer after {args.latency:g} s):")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<20} {median:7.1f} ms  {median / baseline:5.2f}x")


if __name__ == "__main__":
    main()
