"""Shared helpers for benchmark scripts: timing medians and writing tables into RESULTS.md.

Each script owns one section of bench/RESULTS.md, delimited by HTML comments, and
rewrites only that section, so scripts can be rerun independently.
"""

import datetime
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import jax

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine_line() -> str:
    """One line naming the machine, the JAX backend, the date and the command."""
    devices = jax.devices()
    kind = devices[0].device_kind if devices else "?"
    return (
        f"Machine: {platform.machine()} {platform.processor() or ''} "
        f"({len(devices)} x {devices[0].platform}:{kind}), jax {jax.__version__}; "
        f"date {datetime.date.today().isoformat()}; "
        f"command `python -m bench.{Path(sys.argv[0]).stem} {shlex.join(sys.argv[1:])}`".rstrip()
    )


def wall_times(fn, *args, repeats: int, warmup: int) -> list[float]:
    """Wall times in seconds of `repeats` runs of fn(*args) after `warmup` untimed ones,
    blocking on the result.

    Args:
        fn: the function (jitted: the warm-up runs compile it).
        *args: its arguments.
        repeats: timed runs.
        warmup: untimed runs first.

    Returns:
        The times, in run order.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def median_time(fn, *args, repeats: int = 20, warmup: int = 2) -> float:
    """Median wall time in seconds of fn(*args), blocking on the result."""
    return statistics.median(wall_times(fn, *args, repeats=repeats, warmup=warmup))


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(x):
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, title: str, body: str, *, path: str | Path = RESULTS) -> None:
    """Replace (or append) the section `name` of RESULTS.md (or of `path`) with `body`."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    section = f"{begin}\n## {title}\n\n{machine_line()}\n\n{body.strip()}\n{end}"
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = (
        pattern.sub(lambda _: section, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section + "\n"
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: a crash never leaves half a file
