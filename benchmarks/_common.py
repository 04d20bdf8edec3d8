"""Shared set-up for the benchmarks: machine description and RESULTS.md appending."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread(s), Python {platform.python_version()}"
    )


def append_results(title: str, table: str, notes: str = "") -> None:
    """Write a section with the command, machine, date and table to benchmarks/RESULTS.md.

    A section of the same title is replaced where it stands (a rerun supersedes it); a new
    title is appended at the end.
    """
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"\n## {title}\n\n- command: `{command}`\n- machine: {machine()}\n- date: {stamp}\n\n"
        f"```\n{table}\n```\n"
    )
    if notes:
        text += f"\n{notes.strip()}\n"
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEach section is appended by a script under "
                           "`benchmarks/`; the command that produced it is given.\n")
    current = RESULTS.read_text()
    start = current.find(f"\n## {title}\n")
    if start < 0:
        RESULTS.write_text(current + text)
        return
    end = current.find("\n## ", start + 1)
    RESULTS.write_text(current[:start] + text + ("" if end < 0 else current[end:]))
