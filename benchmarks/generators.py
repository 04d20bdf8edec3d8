"""Direction generators: seconds to generate one direction with "host" vs "device".

One direction of the large-model mode as ``volsk._sampling.stream_direction`` makes it: unit
normal over n = 30.5M active coordinates (the Pythia-31M-shaped language model's size),
identity preconditioner, Lebesgue measure (no coefficient sums), written into a float32
buffer with the default block (``volsk._layout.BLOCK``). "host" draws NumPy's PCG64 normals
into a host buffer and copies each block to the device; "device" makes torch's normals on the
device in seeded chunks of 2**15 (``volsk._sampling.DEVICE_CHUNK``). A cell is the median of
``--repeats`` directions (indices 0, 1, …), after one unmeasured direction per generator. On
the CPU both generators run on the host (one torch thread), so the table measures the two
normal samplers, not a host round trip; the CUDA rows come from ``benchmarks/device/lm_gpu.py``
on a lent GPU (its second table), where the device generator removes the copy.

    python benchmarks/generators.py            # n = 30.5M, 5 repeats
    python benchmarks/generators.py --quick    # n = 2M, 3 repeats
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # volsk from this checkout
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import append_results  # noqa: E402

from volsk._layout import ActiveLayout  # noqa: E402
from volsk._sampling import stream_direction  # noqa: E402
from volsk.measures import Lebesgue, MeasureContext  # noqa: E402
from volsk.preconditioners import Identity, PreconditionerContext  # noqa: E402

N_FULL = 30_500_000
GENERATORS = ("host", "device")


def time_generators(n, device, repeats, generators=GENERATORS):
    """{generator: median seconds per direction} for ``stream_direction`` into an (n,)
    float32 buffer on ``device`` (identity map, Lebesgue measure, the default block)."""
    device = torch.device(device)
    mask = torch.ones(n, dtype=torch.bool, device=device)
    P = Identity().bind(PreconditionerContext(None, None, mask))
    measure = Lebesgue().bind(MeasureContext(torch.zeros(0), mask))  # only its n is read
    layout = ActiveLayout(n)
    out = torch.empty(n, dtype=torch.float32, device=device)
    times = {}
    for generator in generators:
        runs = []
        for index in range(repeats + 1):  # the first one warms up allocations and kernels
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            stream_direction(index, 0, out, layout=layout, preconditioner=P, measure=measure,
                             generator=generator)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            runs.append(time.perf_counter() - start)
        times[generator] = statistics.median(runs[1:])
    return times


def table(rows):
    """Rows of (device, n, {generator: seconds}) as a text table with the device/host ratio."""
    lines = [f"{'device':>6}  {'n':>11}  {'host s/dir':>10}  {'device s/dir':>12}  "
             f"{'device/host':>11}"]
    for device, n, times in rows:
        lines.append(f"{device:>6}  {n:>11,}  {times['host']:>10.3f}  {times['device']:>12.3f}  "
                     f"{times['device'] / times['host']:>11.2f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 2M, 3 repeats")
    parser.add_argument("--n", type=int, default=None, help="active coordinates (30.5M)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    n = args.n or (2_000_000 if args.quick else N_FULL)
    repeats = args.repeats or (3 if args.quick else 5)
    rows = [("cpu", n, time_generators(n, "cpu", repeats))]
    if torch.cuda.is_available():
        rows.append(("cuda", n, time_generators(n, "cuda", repeats)))
    text = table(rows)
    print(text)
    append_results(
        "Direction generators: seconds per direction, host vs device",
        text,
        notes=(
            f"One direction of the large-model mode (`stream_direction`: unit normal, identity "
            f"map, Lebesgue measure) over n active coordinates into a float32 buffer with the "
            f"default block; median of {repeats} directions, one torch thread. On the CPU both "
            "generators run on the host: the ratio compares torch's MT19937 normals (seeded "
            "chunks of 2**15) with NumPy's PCG64 ziggurat, so \"auto\" keeps \"host\" there. "
            "The CUDA rows (Philox on the GPU against NumPy plus a host-to-device copy per "
            "block) are measured by `benchmarks/device/lm_gpu.py` on a lent GPU."
        ),
    )


if __name__ == "__main__":
    main()
