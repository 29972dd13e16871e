"""Which kernels of a compiled program XLA runs inside command buffers (CUDA graphs), from its HLO dump.

XLA on GPU gathers runs of consecutive kernels into command buffers (one graph launch for the run) and
launches the rest one by one from the host. A decode step at batch 1 is hundreds of short kernels, so the
host's per-launch cost shows as idle GPU time wherever a run is broken. This reads the
``*after_optimizations.txt`` files of ``XLA_FLAGS=--xla_dump_to=DIR`` and prints, per module: kernels
(fusions, custom calls) inside command-buffer computations and outside them, the command buffers, and
the custom-call targets outside (what breaks the runs).

    XLA_FLAGS=--xla_dump_to=/tmp/hlo python scripts/bench_latency.py ...
    python scripts/command_buffer_census.py /tmp/hlo --out census.json

XLA versions that form command buffers after the HLO, from the thunks (JAX 0.11.2's: run 19a in
benchmarks/NOTES.md found none in the HLO while turning them off cost 1-2.6 ms a step), show every kernel
"outside"; there the thunk's log says what the graphs do (``TF_CPP_VMODULE=command_buffer_thunk=3``, the
suite's ``graph-updates-*`` steps).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re

HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(|\{)")
TARGET = re.compile(r'custom_call_target="([^"]+)"')
CALLED = re.compile(r"(?:to_apply|calls|body|condition|branch_computations)=\{?%?([\w.\-]+)")


def parse_computations(text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines (an HLO module's text)."""
    computations, current = {}, None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            match = HEADER.match(line)
            current = match.group(2) if match else None
            if current is not None:
                computations[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None and " = " in line:
            computations[current].append(line)
    return computations


def census(text: str) -> dict:
    """Counts of one module: kernels in and out of command buffers, buffers, and targets outside."""
    computations = parse_computations(text)
    fused = set()  # computations that are a fusion's body (their ops are not kernels of their own)
    for lines in computations.values():
        for line in lines:
            if " fusion(" in line:
                fused.update(CALLED.findall(line))
    inside = outside = 0
    buffers = sum(1 for name in computations if name.startswith("command_buffer"))
    targets_outside = collections.Counter()
    for name, lines in computations.items():
        if name in fused:
            continue
        in_buffer = name.startswith("command_buffer")
        for line in lines:
            if " fusion(" not in line and " custom-call(" not in line:
                continue
            if in_buffer:
                inside += 1
            else:
                outside += 1
                target = TARGET.search(line)
                targets_outside[target.group(1) if target else "fusion"] += 1
    return {"kernels_in_command_buffers": inside, "kernels_outside": outside, "command_buffers": buffers,
            "outside_by_kind": dict(targets_outside.most_common())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dump_dir")
    parser.add_argument("--out", default=None, help="JSON file of the counts per module")
    parser.add_argument("--min-kernels", type=int, default=50, help="modules with fewer kernels are left out")
    args = parser.parse_args()
    results = {}
    for path in sorted(glob.glob(os.path.join(args.dump_dir, "*after_optimizations.txt"))):
        counts = census(open(path).read())
        if counts["kernels_in_command_buffers"] + counts["kernels_outside"] >= args.min_kernels:
            results[os.path.basename(path)] = counts
            print(os.path.basename(path), json.dumps(counts))
    if not results:
        print(f"no module with >= {args.min_kernels} kernels under {args.dump_dir}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
