"""bench/_xla_options.py's plumbing (a child gets its flags; a rejected flag is reported)
and a --quick run of bench/model_speed.py per option set. No timing assertions."""

import argparse

import pytest

from bench import _xla_options, model_speed
from bench._xla_options import OPTIONS

PRINT_FLAGS = ["-c", "import json, os; print(json.dumps({'flags': os.environ['XLA_FLAGS']}))"]
BOGUS = "--xla_no_such_flag_for_this_test=true"


def test_child_gets_the_callers_flags_then_the_options(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/unused")
    want = "--xla_dump_to=/tmp/unused " + OPTIONS["one_thread"]
    assert _xla_options.child_env(OPTIONS["one_thread"])["XLA_FLAGS"] == want
    assert _xla_options.run_child(OPTIONS["one_thread"], PRINT_FLAGS) == {"flags": want}
    monkeypatch.delenv("XLA_FLAGS")
    assert _xla_options.run_child(OPTIONS["default"], PRINT_FLAGS) == {"flags": ""}


def test_a_flag_jax_rejects_is_an_error_not_a_crash():
    res = _xla_options.run_child(BOGUS, ["-c", "import jax; jax.devices()"])
    assert set(res) == {"error"}
    assert res["error"].startswith("Unknown flag") and BOGUS in res["error"]


def test_option_names_are_checked():
    assert _xla_options.option_names("default,one_thread") == ["default", "one_thread"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown option sets"):
        _xla_options.option_names("default,fast")


def test_quick_run_writes_a_row_set_per_option_and_reports_a_rejected_one(tmp_path, monkeypatch):
    monkeypatch.setitem(OPTIONS, "bogus", BOGUS)
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # children add theirs to the caller's
    path = tmp_path / "RESULTS.md"
    model_speed.main(
        ["--quick", "--only", "models", "--options", "one_thread,bogus", "--results", str(path)]
    )
    text = path.read_text()
    section = text[
        text.index("<!-- BEGIN model_speed -->") : text.index("<!-- END model_speed -->")
    ]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| one_thread")]
    assert len(rows) == 4 + 6  # 4 MLP ranks, 3 CNN ranks x 2 lowerings
    assert [r[2] for r in rows[:4]] == ["16", "8", "4", "2"]
    assert all(float(r[5]) > 0 and float(r[6]) > 0 for r in rows)
    assert f"the child ran with XLA_FLAGS=`{OPTIONS['one_thread']}`" in section
    assert f"XLA_FLAGS='{OPTIONS['one_thread']}' python" in section
    assert f"| bogus | not run: Unknown flag in XLA_FLAGS: {BOGUS} |" in section
    assert "model_speed_layers" not in text and "model_speed_fold" not in text
