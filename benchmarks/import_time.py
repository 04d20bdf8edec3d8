"""Import time: ``import volsk``, ``volsk --help`` and the imports they cannot avoid.

Each command runs in a fresh interpreter; a cell is the fastest of ``--repeats`` runs (wall
clock, and the child's CPU time, which a busy host inflates less), the commands interleaved
round-robin. "eager" is what ``import volsk`` imported before its names became lazy (the
estimator, the integrations and the sweeps); torch and ``sklearn.base`` are the floor of
``from volsk import LocalVolumeEstimator``. For the modules behind a number, run
``python -X importtime -c "import volsk"``.

    python benchmarks/import_time.py            # 5 repeats
    python benchmarks/import_time.py --quick    # 2 repeats
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402

PY = sys.executable
COMMANDS = {
    "python -c pass": [PY, "-c", "pass"],
    "python -c 'import volsk'": [PY, "-c", "import volsk"],
    "python -m volsk.cli --help": [PY, "-m", "volsk.cli", "--help"],
    "python -m volsk.cli estimate --help": [PY, "-m", "volsk.cli", "estimate", "--help"],
    "from volsk import LocalVolumeEstimator": [PY, "-c",
                                               "from volsk import LocalVolumeEstimator"],
    "eager: import volsk.estimator, .integrations, .sweeps": [
        PY, "-c", "import volsk.estimator, volsk.integrations, volsk.sweeps"],
    "import torch": [PY, "-c", "import torch"],
    "import torch, sklearn.base": [PY, "-c", "import torch, sklearn.base"],
}


def run_once(command) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    commands = dict(COMMANDS)
    script = shutil.which("volsk")
    if script:
        commands["volsk --help (the installed script)"] = [script, "--help"]
    load_before = os.getloadavg()
    times = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            times[name].append(run_once(command))
    load_after = os.getloadavg()
    table = pd.DataFrame([
        {"command": name, "wall s": min(w for w, _ in ts), "cpu s": min(c for _, c in ts)}
        for name, ts in times.items()
    ]).to_string(index=False, float_format=lambda v: f"{v:.2f}")
    print(table)
    notes = (
        f"Fastest of {repeats} runs, each in a fresh interpreter. Load average (1 min) "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} cores."
    )
    append_results("Import time" + (" (quick)" if args.quick else ""), table, notes)


if __name__ == "__main__":
    main()
