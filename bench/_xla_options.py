"""The XLA:CPU option sets the speed benches compare, and running a bench's child process
under one of them (bench/llm_speed.py, bench/model_speed.py).

XLA reads XLA_FLAGS once per process, when jax starts its backend, so the library never
sets them: a bench runs each option set in a fresh subprocess with XLA_FLAGS in its
environment, as a user would (`XLA_FLAGS='--xla_cpu_use_xnnpack=true' python ...`).
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

OPTIONS = {
    "default": "",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "onednn": "--xla_cpu_use_onednn=true",
    "one_thread": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
}
_REPO = Path(__file__).resolve().parents[1]
_GLOG_PREFIX = re.compile(r"^[FEWI]\d{4} [\d:.]+\s+\d+ \S+\] ")


def option_names(text: str) -> list[str]:
    """Comma-separated option set names, checked against OPTIONS (an argparse `type`)."""
    names = text.split(",")
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown option sets {unknown}; known: {list(OPTIONS)}")
    return names


def child_env(flags: str) -> dict[str, str]:
    """This process's environment with `flags` appended to its XLA_FLAGS."""
    return dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())


def run_child(flags: str, argv: list[str]) -> dict:
    """Run `python *argv` from the repository root with `flags` added to XLA_FLAGS.

    Args:
        flags: XLA flags, e.g. OPTIONS["xnnpack"].
        argv: the interpreter's arguments, e.g. ["-m", "bench.model_speed", "--child"];
            the child prints its result as JSON on its last line of stdout.

    Returns:
        The child's JSON, or {"error": its last line of stderr} where it failed (as it
        does when this jax rejects a flag: "Unknown flag in XLA_FLAGS: ...").
    """
    proc = subprocess.run(
        [sys.executable, *argv],
        env=child_env(flags),
        cwd=_REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
        return {"error": _GLOG_PREFIX.sub("", lines[-1])[:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def how_to_set(name: str) -> str:
    """How to run a script under the option set `name`, for the benches' notes."""
    flags = OPTIONS[name]
    return f"`XLA_FLAGS='{flags}' python ...`" if flags else "no XLA_FLAGS"
