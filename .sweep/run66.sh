#!/bin/bash
# Run 66: GPU tests of the gpt-oss / MXFP4 / removal work, then gpt-oss-20b dummy latency (bf16, mxfp4) and tput-short.
START=$(date +%s); DEADLINE=${DEADLINE:-540}
L=$OUT/logs; mkdir -p $L benchmarks/results
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > $L/gpu.txt 2>&1
git log -1 --format=%H > $L/commit.txt 2>&1; git status --short >> $L/commit.txt 2>&1
step() { # name, max seconds, command...
  local name=$1 max=$2; shift 2
  local left=$(( DEADLINE - ($(date +%s) - START) ))
  if (( left < 30 )); then echo "$name skipped (left ${left}s)" >> $L/summary.txt; return; fi
  (( max > left )) && max=$left
  local t0=$(date +%s)
  timeout -k 5 $max "$@" > $L/$name.log 2>&1; local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" >> $L/summary.txt
  cp benchmarks/results/*.json $OUT/ 2>/dev/null
}
M=benchmarks/models/gpt-oss-20b
T="tests/test_ragged_paged_attention.py tests/test_grouped_matmul.py tests/test_deferred_norm.py tests/test_quantized_matmul.py"
step k-new 100 python -m pytest -q -m gpu -p no:cacheprovider $T -k "sinks or mxfp4 or e2m1"
step l-oss-bf16 130 python scripts/bench_latency.py --model $M --load-format dummy --num-requests 3 \
  --output-json benchmarks/results/latency-oss-bf16-run66.json
step l-oss-mxfp4 130 python scripts/bench_latency.py --model $M --load-format dummy --quantization mxfp4 \
  --num-requests 3 --output-json benchmarks/results/latency-oss-mxfp4-run66.json
step t-oss-bf16 150 python scripts/bench_throughput.py --model $M --load-format dummy --workload tput-short \
  --num-requests 256 --output-json benchmarks/results/tput-short-oss-bf16-run66.json
step t-oss-mxfp4 150 python scripts/bench_throughput.py --model $M --load-format dummy --quantization mxfp4 \
  --workload tput-short --num-requests 256 --output-json benchmarks/results/tput-short-oss-mxfp4-run66.json
step k-rest 150 python -m pytest -q -m gpu -p no:cacheprovider $T -k "not (sinks or mxfp4 or e2m1)"
cat $L/summary.txt
for f in $L/*.log; do echo "== $f"; tail -6 $f | cut -c1-600; done
