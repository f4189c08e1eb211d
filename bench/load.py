"""What ``%load_ext burst_jupyter`` adds to a fresh IPython: a fresh interpreter that makes an
``InteractiveShell`` and loads the extension, against one that only makes the shell (the baseline), measured in
the same run, in turns.

    python bench/load.py [--runs 10] [--latency 1.0]

Each run is a whole process, timed from its start to its exit, as a kernel's user waits for it. The extension is
loaded twice over: with no settings file and no marketplace, and with the three marketplaces configured (their
fakes, tests/fakes/, serve on loopback and answer every request after ``--latency`` seconds, so a load that
waited on the network would show it; reconciliation runs in a background thread). Printed: the median of
``--runs`` and what it adds to the bare shell's median. Target: at most 150 ms added (issue 10).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fakes.runpod import FakeRunPod
from fakes.thunder import FakeThunder
from fakes.vast import FakeVast

from burst_jupyter.providers import marketplaces

BARE = "from IPython.core.interactiveshell import InteractiveShell\nip = InteractiveShell.instance()\n"
LOAD = BARE + "ip.run_line_magic('load_ext', 'burst_jupyter')\n"

#: The variables each marketplace declares for its key and URL, as a user would set them.
ENV = {d.name: (d.account.key_var, d.account.url_var) for d in marketplaces() if d.account is not None}


def process_ms(code: str, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True)
    return (time.perf_counter() - t0) * 1000


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
        process_ms(LOAD, base)  # warm the file cache and the bytecode
        runs = {"bare InteractiveShell": (BARE, base), "+ %load_ext": (LOAD, base),
                "+ %load_ext, 3 markets": (LOAD, configured)}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.runs):
            for name, (code, env) in runs.items():
                times[name].append(process_ms(code, env))
        for cloud in clouds.values():
            cloud.close()
    baseline = statistics.median(times["bare InteractiveShell"])
    print(f"a fresh IPython, whole process, median of {args.runs} (fakes answer after {args.latency:g} s):")
    for name, values in times.items():
        median = statistics.median(values)
        added = f"  adds {median - baseline:6.1f} ms" if values is not times["bare InteractiveShell"] else ""
        print(f"  {name:<24} {median:7.1f} ms{added}")


if __name__ == "__main__":
    main()
