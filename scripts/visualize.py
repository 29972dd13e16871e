"""Pictures of the engine at work, as PNG, from engine traces and benchmark results.

- ``timeline``: which request ran in which step (x = step, y = request, one colour per
  request, prompt chunks outlined in black), one panel per trace side by side (e.g.
  continuous next to static batching), with the sequences running per step below;
- ``blockmap``: the physical KV blocks at one step, each coloured by the sequence
  whose block table holds it (the written part solid, the allocated-but-unwritten
  tail pale; shared blocks hatched; block 0, the padding sink, black);
- ``waste``: allocated-but-unwritten KV slots per step, paged pool against
  contiguous reservations of the same sequences;
- ``results``: throughput against batch size and latency CDFs from the results JSON
  files present (each figure only where its data is);
- ``static-vs-continuous RESULT.json``: timeline, block maps and waste from the two
  traces a ``bench_static_vs_continuous`` run saved.

    python scripts/visualize.py static-vs-continuous benchmarks/results/static-vs-continuous-cpu-DATE.json \\
        --out-dir benchmarks/figures
    python scripts/visualize.py results --results-dir benchmarks/results --out-dir benchmarks/figures

Reads traces through ``engine.trace``; knows nothing of the engine beyond them.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import PatchCollection  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.trace import StepTrace  # noqa: E402

DPI = 100
PALETTE = plt.get_cmap("tab20").colors


def request_colours(trace: StepTrace) -> dict[str, tuple]:
    """A colour per request, by order of first appearance (the same request keeps it in every panel)."""
    return {rid: PALETTE[i % len(PALETTE)] for i, rid in enumerate(trace.request_ids())}


def _runs(steps: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive step indices as ``(first, length)`` runs."""
    runs: list[list[int]] = []
    for s in steps:
        if runs and s == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([s, 1])
    return [tuple(r) for r in runs]


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    print(f"wrote {path}")
    return path


# --------------------------------------------------------------------------------------
# Traces
# --------------------------------------------------------------------------------------


def plot_timeline(traces: Sequence[StepTrace], labels: Sequence[str], path: str) -> str:
    """Side-by-side request timelines with the batch occupancy under each."""
    fig, axes = plt.subplots(2, len(traces), figsize=(6.5 * len(traces), 6.5), sharex=True, squeeze=False,
                             gridspec_kw=dict(height_ratios=[4, 1]))
    for col, (trace, label) in enumerate(zip(traces, labels)):
        ax, occ = axes[0, col], axes[1, col]
        colours = request_colours(trace)
        spans = trace.request_spans()
        first = trace.records[0].step if trace.records else 0
        for y, rid in enumerate(trace.request_ids()):
            steps = [step - first for step, _ in spans[rid]]
            ax.broken_barh(_runs(steps), (y - 0.4, 0.8), facecolors=colours[rid])
            prefill = [step - first for step, s in spans[rid] if s.is_prefill]
            if prefill:
                ax.broken_barh(_runs(prefill), (y - 0.4, 0.8), facecolors="none", edgecolors="black", linewidth=0.8)
        ax.set_ylim(len(spans) - 0.5, -0.5)
        ax.set_ylabel("request (by first step)")
        ax.set_title(f"{label}: {len(trace.records)} steps")
        steps = [r.step - first for r in trace.records]
        occ.fill_between(steps, [len(r.scheduled) for r in trace.records], step="mid", color="tab:blue", alpha=0.6,
                         label="sequences in the step")
        occ.axhline(trace.max_num_seqs, color="black", linestyle="--", linewidth=0.8, label="max_num_seqs")
        occ.set_ylim(0, trace.max_num_seqs * 1.15)
        occ.set_xlabel("step")
        occ.set_ylabel("batch")
        if col == 0:
            occ.legend(loc="lower left", fontsize=7)
    axes[0, 0].legend(handles=[Patch(facecolor="lightgrey", edgecolor="black", label="prompt chunk (prefill)"),
                               Patch(facecolor="lightgrey", label="decode")], loc="lower right", fontsize=8)
    fig.suptitle("Continuous vs static batching: which request runs in which step")
    fig.tight_layout()
    return _save(fig, path)


def busiest_step(trace: StepTrace) -> int:
    """Index (in the trace) of the step with the most KV blocks in use (the first such step)."""
    if not trace.records:
        raise ValueError("the trace has no steps")
    return max(range(len(trace.records)), key=lambda i: (trace.records[i].num_used_blocks, -i))


def plot_block_map(traces: Sequence[StepTrace], labels: Sequence[str], path: str,
                   steps: Optional[Sequence[Optional[int]]] = None, columns: Optional[int] = None) -> str:
    """The physical block pool at one step per trace (an index into its records, as on the timeline's
    x axis; default: its busiest step)."""
    steps = list(steps) if steps else [None] * len(traces)
    num_blocks = max(t.num_blocks for t in traces)
    columns = columns or max(8, min(64, math.ceil(math.sqrt(num_blocks * 2))))
    rows = math.ceil(num_blocks / columns)
    fig, axes = plt.subplots(1, len(traces), figsize=(max(5.5, columns * 0.22) * len(traces), rows * 0.22 + 2.0),
                             squeeze=False)
    for ax, trace, label, step in zip(axes[0], traces, labels, steps):
        index = busiest_step(trace) if step is None else step
        if not 0 <= index < len(trace.records):
            raise ValueError(f"step {index} is outside the trace's {len(trace.records)} steps")
        record = trace.records[index]
        colours = request_colours(trace)
        owners: dict[int, list[tuple[str, int]]] = {}  # block -> (request, slots it wrote there)
        for seq in record.sequences:
            for i, block in enumerate(seq.block_table):
                filled = min(trace.block_size, seq.num_tokens - i * trace.block_size)
                owners.setdefault(block, []).append((seq.request_id, filled))
        solid, pale, patches_free = [], [], []
        for block in range(trace.num_blocks):
            x, y = block % columns, block // columns
            if block == 0:
                solid.append((Rectangle((x, y), 0.92, 0.92), (0, 0, 0)))
            elif block not in owners:
                patches_free.append(Rectangle((x, y), 0.92, 0.92))
            else:
                rid, filled = owners[block][0]
                frac = max(filled for _, filled in owners[block]) / trace.block_size
                solid.append((Rectangle((x, y), 0.92 * frac, 0.92, hatch="///" if len(owners[block]) > 1 else None),
                              colours[rid]))
                if frac < 1:
                    pale.append((Rectangle((x + 0.92 * frac, y), 0.92 * (1 - frac), 0.92), colours[rid]))
        ax.add_collection(PatchCollection(patches_free, facecolor="white", edgecolor="lightgrey", linewidth=0.5))
        ax.add_collection(PatchCollection([p for p, _ in solid], facecolor=[c for _, c in solid], edgecolor="none"))
        if pale:
            ax.add_collection(PatchCollection([p for p, _ in pale], facecolor=[c for _, c in pale], alpha=0.3,
                                              edgecolor="none"))
        ax.set_xlim(0, columns)
        ax.set_ylim(rows, 0)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{label}, step {index}: {len(record.sequences)} sequences, "
                     f"{record.num_used_blocks}/{trace.num_blocks - 1} blocks\n{record.num_wasted_slots} of "
                     f"{record.num_allocated_slots} allocated slots unwritten", fontsize=9)
    fig.suptitle(f"Physical KV blocks ({traces[0].block_size} tokens each), coloured by sequence\n"
                 "black: block 0 (padding sink); pale: allocated, not yet written; hatched: shared", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_waste(traces: Sequence[StepTrace], labels: Sequence[str], path: str) -> str:
    """Unwritten share of allocated KV slots per step: paged vs contiguous reservations."""
    fig, axes = plt.subplots(1, len(traces), figsize=(6 * len(traces), 3.6), sharey=True, squeeze=False)
    for ax, trace, label in zip(axes[0], traces, labels):
        rows = [r for r in trace.kv_waste() if r["num_seqs"]]
        first = trace.records[0].step
        steps = [r["step"] - first for r in rows]
        for key, name, colour in (("paged_allocated", f"paged (block {trace.block_size})", "tab:green"),
                                  ("contiguous_reserved_allocated", "contiguous, prompt + max_tokens", "tab:orange"),
                                  ("contiguous_max_model_len_allocated",
                                   f"contiguous, max_model_len={trace.max_model_len}", "tab:red")):
            waste = [1 - r["written"] / r[key] for r in rows]
            mean = sum(waste) / len(waste) if waste else 0.0
            ax.plot(steps, waste, color=colour, linewidth=1, label=f"{name} (mean {mean:.0%})")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper right", framealpha=0.9)
    axes[0, 0].set_ylabel("allocated slots not written")
    fig.suptitle("KV-cache waste of the same running sequences")
    fig.tight_layout()
    return _save(fig, path)


def static_vs_continuous(result_path: str, out_dir: str, step: Optional[int] = None) -> list[str]:
    with open(result_path) as f:
        result = json.load(f)
    folder = os.path.dirname(os.path.abspath(result_path))
    labels = list(result["traces"])
    traces = [StepTrace.load(os.path.join(folder, result["traces"][m])) for m in labels]
    titles = [f"{m} ({result[m]['output_tok_s']:.0f} tok/s)" for m in labels]
    stem = os.path.join(out_dir, os.path.splitext(os.path.basename(result_path))[0])
    return [plot_timeline(traces, titles, f"{stem}-timeline.png"),
            plot_block_map(traces, labels, f"{stem}-blockmap.png", steps=[step] * len(traces) if step else None),
            plot_waste(traces, labels, f"{stem}-kv-waste.png")]


# --------------------------------------------------------------------------------------
# Results JSON
# --------------------------------------------------------------------------------------


def load_results(results_dir: str) -> list[dict]:
    results = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        results.extend(d for d in (data if isinstance(data, list) else [data]) if isinstance(d, dict))
    return results


def plot_throughput_vs_batch(results: list[dict], path: str) -> Optional[str]:
    """Output tok/s against the batch (max_num_seqs for us, the generate() batch for the peer)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        where = f"{r.get('model')}, {r.get('device')}"
        if r.get("workload", "").startswith("tput-"):
            series.setdefault(f"pagedjax {r['workload']} ({where})", []).append((r["max_num_seqs"], r["output_tok_s"]))
            peer = r.get("peer") or {}
            if peer.get("output_tok_s"):
                series.setdefault(f"HF generate {r['workload']} ({where})", []).append(
                    (peer["batch_size"], peer["output_tok_s"]))
        elif r.get("workload") == "static-vs-continuous":
            for mode in ("continuous", "static"):
                series.setdefault(f"pagedjax {mode} batching ({where})", []).append(
                    (r[mode]["max_num_seqs"], r[mode]["output_tok_s"]))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (max concurrent sequences)")
    ax.set_ylabel("output tokens / s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Throughput against batch size")
    fig.tight_layout()
    return _save(fig, path)


def plot_latency_cdf(results: list[dict], path: str) -> Optional[str]:
    """CDF of every per-token or per-request latency sample list (``*_ms_samples``) in the results."""
    curves = []
    for r in results:
        for key, values in r.items():
            if key.endswith("_ms_samples") and isinstance(values, list) and values:
                name = f"{r.get('workload')} {key.removesuffix('_samples')} ({r.get('device')})"
                curves.append((name, sorted(values)))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in curves:
        n = len(values)
        ax.step(values, [(i + 1) / n for i in range(n)], where="post", label=f"{name}, n={n}")
    ax.set_xscale("log")
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction ≤ x")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Latency CDF")
    fig.tight_layout()
    return _save(fig, path)


def results_figures(results_dir: str, out_dir: str) -> list[str]:
    results = load_results(results_dir)
    written = [plot_throughput_vs_batch(results, os.path.join(out_dir, "throughput-vs-batch.png")),
               plot_latency_cdf(results, os.path.join(out_dir, "latency-cdf.png"))]
    if not any(written):
        print(f"no throughput or latency samples in {results_dir}")
    return [p for p in written if p]


# --------------------------------------------------------------------------------------


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("timeline", "blockmap", "waste"):
        p = sub.add_parser(name)
        p.add_argument("--trace", action="append", required=True, help="trace file (.json or .json.gz); repeatable")
        p.add_argument("--label", action="append", help="a title per trace")
        p.add_argument("--out", required=True)
        if name == "blockmap":
            p.add_argument("--step", type=int, action="append",
                           help="step index per trace (default: its busiest step)")
    p = sub.add_parser("static-vs-continuous")
    p.add_argument("result")
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "figures"))
    p.add_argument("--step", type=int, default=None, help="block map step (default: each trace's busiest)")
    p = sub.add_parser("results")
    p.add_argument("--results-dir", default=os.path.join("benchmarks", "results"))
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "figures"))
    args = parser.parse_args(argv)

    if args.command == "static-vs-continuous":
        return static_vs_continuous(args.result, args.out_dir, args.step)
    if args.command == "results":
        return results_figures(args.results_dir, args.out_dir)
    traces = [StepTrace.load(p) for p in args.trace]
    labels = args.label or [os.path.basename(p).split(".trace")[0] for p in args.trace]
    if len(labels) != len(traces):
        parser.error(f"got {len(labels)} --label for {len(traces)} --trace")
    if args.command == "timeline":
        return [plot_timeline(traces, labels, args.out)]
    if args.command == "blockmap":
        if args.step and len(args.step) != len(traces):
            parser.error(f"got {len(args.step)} --step for {len(traces)} --trace")
        return [plot_block_map(traces, labels, args.out, steps=args.step)]
    return [plot_waste(traces, labels, args.out)]


if __name__ == "__main__":
    main()
