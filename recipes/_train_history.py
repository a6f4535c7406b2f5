"""Run outputs on disk: atomic text files, metrics.jsonl and the PNG of its curves."""

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (a temporary file, then a rename).

    Args:
        path: the file.
        text: its new contents.
    """
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in history))


def plot_history(history: Sequence[dict[str, Any]], path: Path) -> None:
    """One panel per metric, train and eval curves against the step, as a PNG.

    Args:
        history: the trainer's records.
        path: the PNG to write.
    """
    from matplotlib.figure import Figure

    skip = {"step", "split", "time", "examples_per_s", "event"}
    names = sorted({k for r in history for k in r if k not in skip})
    if not names:
        return
    figure = Figure(figsize=(4 * len(names), 3.2))
    figure.subplots_adjust(left=0.08, right=0.97, bottom=0.16, top=0.88, wspace=0.3)
    for ax, name in zip(figure.subplots(1, len(names), squeeze=False)[0], names):
        for split in ("train", "eval"):
            points = [(r["step"], r[name]) for r in history if r["split"] == split and name in r]
            if points:
                ax.plot(*zip(*points), marker="." if split == "eval" else None, label=split)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend()
    figure.savefig(path, dpi=100)
