#!/usr/bin/env bash
# On the lent GPU machine, after ../shared/device's carry (`source "$HOME/carry/env.sh"`): issue 27's
# exact-centre experiment in one 10-minute command, everything it learns under $OUT (8 files):
# the engine's speed at R 576 against the named LoRA baseline, then a fresh 500-step warm start and
# the `exact` recipes of benchmarks/learning_runs.py side by side until DEADLINE, the members'
# signal in every generation (benchmarks/member_signal.py, on the full ledger), the slim ledger.
# The data dir does not outlive the machine: what $OUT holds is the result. The paper's problems
# travel as .devcarry/data/countdown.json (mkdir -p .devcarry/data && cp ../shared/data/countdown.json
# .devcarry/data/ here, after scripts/device/pack.sh; carry .devcarry/data with the last chunk).
set -uo pipefail
export ES="python3 -m flows.cli" PYTHONUNBUFFERED=1
data=${DATA:-/root/esdata} paper=${PAPER:-.devcarry/data/countdown.json}
timeout "${BENCH_S:-80}" python3 -m benchmarks.bench_weights_space --centre-ranks 576 --json "$OUT/bench-576.json" > "$OUT/bench-576.log" 2>&1
echo "bench: rc $?"; tail -4 "$OUT/bench-576.log"
python3 -m benchmarks.learning_runs sweep "$data" --recipes exact --generations ${GENERATIONS:-30} --deadline "${DEADLINE:-400}" --paper "$paper" > "$OUT/sweep.log" 2>&1
echo "sweep: rc $?"; tail -5 "$OUT/sweep.log"
timeout 60 python3 -m benchmarks.member_signal "$data/ledger.duckdb" --json "$OUT/member-signal.json" | tail -12
python3 -c "import os, sys; from pathlib import Path; from benchmarks.learning_report import slim_copy; slim_copy(Path(sys.argv[1]), Path(os.environ['OUT']) / 'ledger.duckdb')" "$data"
cp "$data"/sft-500.log "$data"/wsx-*.log "$OUT"/ 2>/dev/null
grep -h "held-out (centre" "$data"/wsx-*.log | tail -8
