"""``scripts/bench_kernels.py --smoke --sections prefill`` runs on CPU and writes the
kernel-prefill record: our kernel's time and error, and the dense peers (cuDNN flash
attention, XLA) either measured against our output or recorded with their error."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "bench_kernels.py")


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_prefill_smoke_writes_record(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", BENCH_COMMIT="test")
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--sections", "prefill", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr  # main() prints a failed section's traceback and goes on
    files = glob.glob(str(tmp_path / "kernel-prefill-*.json"))
    assert len(files) == 1, (files, proc.stdout, proc.stderr)
    with open(files[0]) as f:
        (r,) = json.load(f)

    assert r["workload"] == "kernel-prefill"
    assert r["shape"]["q_len"] == r["shape"]["kv_len"]
    assert _is_number(r["us"]) and r["us"] > 0
    assert _is_number(r["tflop_s"]) and r["tflop_s"] > 0
    assert r["rel_err_vs_reference"] < 1e-2
    assert math.isclose(r["target_ratio_vs_cudnn"], 1 / 1.3)

    assert set(r["peers"]) == {"cudnn_flash_attention", "xla_dot_product_attention"}
    assert r["peer"] == r["peers"]["cudnn_flash_attention"]
    for label, p in r["peers"].items():
        if "error" in p:
            assert isinstance(p["error"], str) and p["error"], label
            continue
        for key in ("us", "tflop_s", "rel_err_vs_ours", "rel_err_vs_reference"):
            assert _is_number(p[key]), (label, key, p)
        assert p["us"] > 0
        assert p["rel_err_vs_ours"] < 1e-2, (label, p)  # same shapes, layouts converted right
    # XLA runs everywhere, so the layout conversion is always checked.
    assert "error" not in r["peers"]["xla_dot_product_attention"], r["peers"]
    if "error" in r["peer"]:
        assert r["ratio"] is None
    else:
        assert math.isclose(r["ratio"], r["peer"]["us"] / r["us"])

    assert "kernel-prefill" in proc.stdout.split("workload        case")[-1]  # a row in the summary table
