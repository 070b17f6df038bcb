#!/usr/bin/env bash
# Everything deqlm measures on a lent GPU, in one call of about 8 minutes on an H100 (see docs/benchmarks.md):
#
#   scripts/gpu_session.sh OUTDIR
#
#   1. speed pairs (scripts/bench_gpu.sh, GPU to itself), while the solver benchmark runs on two host CPU
#      cores (python -m deqlm.bench solver, 2 threads, pinned away from the GPU jobs' cores)
#   2. the paper's memory rows (scripts/bench_gpu.sh; allocator peaks per fresh process, so unaffected by the
#      copy-memory runs sharing the GPU), while copy memory T=400 trains on the GPU: DEQ-Transformer and its
#      unrolled baseline (experiments/copy/gpu/*.yaml), each capped at COPY_TIMEOUT seconds, then evaluated on all
#      2,000 test sequences (python -m deqlm.eval)
#   3. a profile of one Broyden solve at DEQ-TrellisNet size (the per-step cost beyond f, for the next tuning)
#
# OUTDIR gets at most 8 files: bench_gpu.sh's six (gpu-env.json, gpu-memory.{json,md}, gpu-speed.{json,md},
# gpu-log.txt), gpu-solver.json (host CPU) and gpu-extras.tar.gz (the copy runs' small files and logs, the
# profile). Dry run on any machine: DEVICE=cpu EXTRA=--quick COPY_ARGS="data.copy_T=20 data.tgt_len=40
# eval.tgt_len=40 train.max_steps=2 train.device=cpu" PROFILE_ARGS="--size reduced --row ptb-deq-trellisnet"
# scripts/gpu_session.sh /tmp/out
set -u
OUT=${1:?usage: scripts/gpu_session.sh OUTDIR}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
COPY_TIMEOUT=${COPY_TIMEOUT:-240}   # seconds per copy-memory training run (both run at once)
COPY_ARGS=${COPY_ARGS:-}            # extra overrides for the copy runs (dry runs)
SOLVER_CPUS=${SOLVER_CPUS:-12,13}   # host cores for the solver benchmark
PROFILE_ARGS=${PROFILE_ARGS:-}      # e.g. "--size reduced --row ptb-deq-trellisnet" for a CPU dry run

cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/deqlm-gpu-session.XXXXXX)
mkdir -p "$WORK/extras"
LOG="$OUT/gpu-log.txt"
export PYTHONUNBUFFERED=1 PYTHON DEVICE
log() { echo "[gpu_session $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

pin() {  # taskset when the cores exist, plain otherwise
    if command -v taskset >/dev/null 2>&1 && taskset -c "$SOLVER_CPUS" true 2>/dev/null; then
        taskset -c "$SOLVER_CPUS" "$@"
    else
        "$@"
    fi
}

if ls .whl/*.whl >/dev/null 2>&1 && [ ! -f /tmp/site/.deqlm-wheels ]; then
    log "installing carried wheels from .whl/ into /tmp/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 \
        && touch /tmp/site/.deqlm-wheels || log "wheel install failed (continuing)"
fi
[ -f /tmp/site/.deqlm-wheels ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
QUICK=""; [ "${EXTRA:-}" = --quick ] && QUICK=--quick

log "phase 1: speed on the GPU, solver benchmark on host cores $SOLVER_CPUS"
pin "$PYTHON" -m deqlm.bench solver --json $QUICK --out "$OUT/gpu-solver.json" > "$WORK/extras/solver.log" 2>&1 &
SOLVER_PID=$!
PHASES=speed scripts/bench_gpu.sh "$OUT"
wait "$SOLVER_PID"; log "solver benchmark exit $? ($(wc -l < "$WORK/extras/solver.log") lines)"

log "phase 2: memory rows on the GPU while copy memory trains (${COPY_TIMEOUT}s cap per run)"
COPY_RUNS="$WORK/runs"
for exp in transformer_deq transformer_unrolled; do
    # shellcheck disable=SC2086
    timeout -k 10 "$COPY_TIMEOUT" "$PYTHON" -m deqlm.train "experiments/copy/gpu/$exp.yaml" \
        train.run_dir="$COPY_RUNS" log.wandb_mode=disabled $COPY_ARGS > "$WORK/extras/copy_$exp.log" 2>&1 &
done
PHASES=memory scripts/bench_gpu.sh "$OUT"
wait
log "copy runs ended: $(tail -n 1 "$WORK"/extras/copy_*.log | tr '\n' ' ')"
for run in "$COPY_RUNS"/copy/*/*/; do
    # shellcheck disable=SC2086
    timeout -k 10 120 "$PYTHON" -m deqlm.eval "$run" device="$DEVICE" >> "$WORK/extras/copy_eval.log" 2>&1 \
        || log "eval failed for $run"
done

log "phase 3: profile of one Broyden solve"
# shellcheck disable=SC2086
timeout -k 10 60 "$PYTHON" scripts/profile_solver.py --device "$DEVICE" $PROFILE_ARGS > "$WORK/extras/profile.txt" 2>&1 \
    || log "profile failed"

# the copy runs' small files (no checkpoints) and everything logged, in one archive
(cd "$COPY_RUNS" 2>/dev/null && find . -type f ! -name '*.pt' ! -path '*/wandb/*' -print0 \
    | xargs -0 -r tar -cf "$WORK/extras/copy-runs.tar")
tar -czf "$OUT/gpu-extras.tar.gz" -C "$WORK" extras
rm -rf "$WORK"
log "done: $(ls "$OUT" | tr '\n' ' ')"
