#!/usr/bin/env bash
# On the lent GPU machine, after ../shared/device's carry (`source "$HOME/carry/env.sh"`): issue 27's
# learning sweeps (and the plateau, the final rows: STEP below) in 10-minute commands, everything they learn under $OUT (at most 8 files): the
# 500-step warm start (trained by the first command on a fresh machine; later ones find it) and the
# recipe set RECIPES of benchmarks/learning_runs.py (default `exact`), side by side, or each alone
# with ALONE=1 (its wall time is then the GPU's), until DEADLINE seconds after the sweep began; the members' signal in every generation
# (benchmarks/member_signal.py, on the full ledger), the slim ledger, the runs' logs (benchmarks/snapshot.py,
# every minute as they come and once at the end); then, if
# BENCH_S > 0, the engine's speed at R 576 against the named LoRA baseline.
# The data dir (DATA) outlives the command only while the machine stays warm: what $OUT holds is the
# result, and its slim ledger takes the runs to the next machine (LEDGER below). The paper's problems
# travel as .devcarry/data/countdown.json (mkdir -p .devcarry/data && cp
# ../shared/data/countdown.json .devcarry/data/ here, after scripts/device/pack.sh; carry .devcarry/data).
set -uo pipefail
export ES="python3 -m flows.cli" PYTHONUNBUFFERED=1
data=${DATA:-/root/esdata} paper=${PAPER:-.devcarry/data/countdown.json}
# STEP (default sweep) picks learning_runs' step: `plateau` continues the warm start EVERY steps at a
# time until it stops gaining (or DEADLINE); `final` continues the best recipe and runs the supervised
# baseline in DEADLINE seconds; WARM_STEPS starts sweep and final from that longer warm start (the plateau's).
step=${STEP:-sweep}
case "$step" in
  sweep) args=(--recipes "${RECIPES:-exact}" --generations "${GENERATIONS:-200}" --deadline "${DEADLINE:-480}")
         [ "${ALONE:-0}" = 1 ] && args+=(--one-at-a-time) ;;
  plateau) args=(--every "${EVERY:-500}" --deadline "${DEADLINE:-480}") ;;
  final) args=(--recipes "${RECIPES:-exact}" --limit "${DEADLINE:-480}") ;;
  *) echo "STEP=$step: one of sweep, plateau, final"; exit 2 ;;
esac
[ -n "${WARM_STEPS:-}" ] && args+=(--warm-steps "$WARM_STEPS")
# EXTRA_ARGS: more of learning_runs' options, as words (a CPU rehearsal: "--set model.name=tiny-llama ...")
read -ra extra <<< "${EXTRA_ARGS:-}"; args+=("${extra[@]}")
# LEDGER: the slim ledger an earlier lease brought back (a committed docs/results/<dir>/ledger.duckdb):
# a fresh machine's data dir starts from it, so its runs go on where they stopped (`resume` rebuilds
# their centres from the ledger, every update replayed and hash-checked; the warm starts are trained again,
# a plateau's 500 steps a command, each continuing the last, bitwise the same on the same GPU kind, or
# the run is refused)
if [ -n "${LEDGER:-}" ] && [ ! -f "$data/ledger.duckdb" ]; then
  mkdir -p "$data" && python3 -m artifacts.slim "$(dirname "$LEDGER")" "$data/ledger.duckdb" || exit 2
fi
# every SNAPSHOT_S seconds the slim ledger, learning-*.json and the logs go to $OUT (each replaced
# whole): a command killed at its limit still brings back what the runs had committed by then
python3 -m benchmarks.snapshot "$data" "$OUT" --every "${SNAPSHOT_S:-60}" & snapshots=$!
python3 -m benchmarks.learning_runs "$step" "$data" "${args[@]}" --paper "$paper" > "$OUT/sweep.log" 2>&1
echo "$step: rc $?"; tail -5 "$OUT/sweep.log"
kill "$snapshots" 2>/dev/null; wait "$snapshots" 2>/dev/null
python3 -m benchmarks.snapshot "$data" "$OUT" || echo "the last snapshot failed: \$OUT keeps the one before"
timeout "${SIGNAL_S:-150}" python3 -m benchmarks.member_signal "$data/ledger.duckdb" --json "$OUT/member-signal.json" | tail -12
grep -h "held-out (centre" "$data"/w*.log | tail -12
if [ "${BENCH_S:-0}" -gt 0 ]; then
  timeout "$BENCH_S" python3 -m benchmarks.bench_weights_space --centre-ranks 576 --json "$OUT/bench-576.json" > "$OUT/bench-576.log" 2>&1
  echo "bench: rc $?"; tail -4 "$OUT/bench-576.log"
fi
