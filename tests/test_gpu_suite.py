"""The GPU suite's step table (``scripts/run_gpu_suite.py``), checked on the CPU: a mistake there shows only on a
leased GPU, where it costs device time. Names are unique, what ``REQUIRES`` / ``FALLBACKS`` name exists, every
script a step runs is in the checkout, and ``--dry-run`` lists every step."""

from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import run_gpu_suite  # noqa: E402


def test_step_names_are_unique_and_their_links_exist(tmp_path):
    table = run_gpu_suite.steps(str(tmp_path))
    names = [name for name, _, _ in table]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
    for step, needed in {**run_gpu_suite.REQUIRES, **run_gpu_suite.FALLBACKS}.items():
        assert step in names and needed in names, (step, needed)
    assert all(isinstance(limit, (int, float)) and limit > 0 for _, _, limit in table)


def test_every_script_a_step_runs_is_in_the_checkout(tmp_path):
    for name, argv, _ in run_gpu_suite.steps(str(tmp_path)):
        scripts = set(re.findall(r"(?:scripts|tests)/[\w/]+\.py", " ".join(argv)))
        missing = [path for path in scripts if not os.path.exists(os.path.join(ROOT, path))]
        assert not missing, (name, missing)


def test_dry_run_lists_every_step(tmp_path, capsys):
    names = [name for name, _, _ in run_gpu_suite.steps(str(tmp_path / "results"))]
    run_gpu_suite.main(["--out", str(tmp_path), "--dry-run", "--deadline-s", "1e9", "--min-start-s", "0",
                        "--steps", ",".join(names)])
    listed = [line.split(" ", 1)[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == names
