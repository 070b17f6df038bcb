#!/usr/bin/env bash
# Copy memory T=400 on one GPU: the DEQ-Transformer and its unrolled baseline (experiments/copy/gpu/*.yaml),
# several seeds at once, each run evaluated on all 2,000 test sequences (python -m deqlm.eval), the runs' small
# files (config.yaml, env.json, metrics.jsonl, eval.json; no checkpoints) packed into OUTDIR/copy-runs.tar.gz with
# paths <experiment>/<stamp>-seed<seed>/, ready for results/copy/runs/; the console logs go to copy-logs.tar.gz.
#
#   scripts/copy_seeds.sh OUTDIR
#
# Environment: SEEDS (default "1111 1112 1113"), EXPERIMENTS (default "transformer_deq transformer_unrolled"),
# TRAIN_TIMEOUT (seconds per training run, all runs at once; a run cut short is evaluated at its best
# checkpoint), DEVICE (cuda), COPY_ARGS (extra overrides for every run), PYTHON (python3).
# Dry run on any machine: DEVICE=cpu COPY_ARGS="data.copy_T=20 data.tgt_len=40 eval.tgt_len=40 train.max_steps=4
# model.pretrain_steps=2 train.eval_every=4 train.ckpt_every=4" scripts/copy_seeds.sh /tmp/out
# Needs torch and omegaconf; offline machines carry omegaconf's wheel in .whl/ (see scripts/bench_gpu.sh).
set -u
OUT=${1:?usage: scripts/copy_seeds.sh OUTDIR}
SEEDS=${SEEDS:-"1111 1112 1113"}
EXPERIMENTS=${EXPERIMENTS:-"transformer_deq transformer_unrolled"}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-420}
DEVICE=${DEVICE:-cuda}
COPY_ARGS=${COPY_ARGS:-}
PYTHON=${PYTHON:-python3}

cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/deqlm-copy-seeds.XXXXXX)
LOG="$OUT/copy-log.txt"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "[copy_seeds $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

if ls .whl/*.whl >/dev/null 2>&1 && ! $PYTHON -c "import omegaconf" 2>/dev/null; then
    $PYTHON -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
$PYTHON -c "import torch, omegaconf; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    >>"$LOG" 2>&1 || { log "FATAL: cannot import torch and omegaconf"; exit 1; }

log "training: seeds [$SEEDS], experiments [$EXPERIMENTS], ${TRAIN_TIMEOUT}s cap per run, device $DEVICE"
for seed in $SEEDS; do
    for exp in $EXPERIMENTS; do
        # shellcheck disable=SC2086
        timeout -k 10 "$TRAIN_TIMEOUT" "$PYTHON" -m deqlm.train "experiments/copy/gpu/$exp.yaml" \
            train.seed="$seed" train.device="$DEVICE" train.run_dir="$WORK/seed$seed" log.progress=false log.wandb_mode=disabled \
            $COPY_ARGS > "$WORK/train-$exp-$seed.log" 2>&1 &
    done
done
wait
for f in "$WORK"/train-*.log; do log "$(basename "$f"): $(grep -E 'valid' "$f" | tail -n 1)"; done

log "evaluating every run on the whole test split"
for run in "$WORK"/seed*/copy/*/*/; do
    "$PYTHON" -m deqlm.eval "$run" device="$DEVICE" >> "$WORK/eval.log" 2>&1 || log "eval failed for $run" &
done
wait
grep -hE "test|error" "$WORK/eval.log" | tail -n 20 | tee -a "$LOG"

mkdir -p "$WORK/pack"
for run in "$WORK"/seed*/copy/*/*/; do
    seed=$(basename "$(dirname "$(dirname "$(dirname "$run")")")"); seed=${seed#seed}
    dest="$WORK/pack/$(basename "$(dirname "$run")")/$(basename "$run")-seed$seed"
    mkdir -p "$dest"
    find "$run" -maxdepth 1 -type f ! -name '*.pt' -exec cp {} "$dest/" \;
done
mkdir -p "$WORK/logs"
cp "$WORK"/train-*.log "$WORK/eval.log" "$WORK/logs/" 2>/dev/null
tar -czf "$OUT/copy-runs.tar.gz" -C "$WORK/pack" .
tar -czf "$OUT/copy-logs.tar.gz" -C "$WORK/logs" .
rm -rf "$WORK"
log "done: $(ls "$OUT" | tr '\n' ' ')"
