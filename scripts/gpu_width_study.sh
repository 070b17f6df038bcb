#!/usr/bin/env bash
# The GPU width study: the PTB Transformer pair of record (experiments/ptb/gpu/*.yaml) at
# d_model 128, 256 and 512, plus an 8-layer baseline at 256, on one GPU in under 9 minutes (H100):
#
#   scripts/gpu_width_study.sh OUT [--tiny]
#
# Rows run one after the other; in a row the DEQ and its baseline(s) train at once on the GPU (background
# processes, then wait), the row under its own time limit:
#
#   row   runs (experiments/ptb/gpu/)                                           limit
#   d128  transformer_deq_d128, transformer_unrolled_d128                        125 s
#   d256  transformer_deq_d256, transformer_unrolled_d256, _unrolled_d256_l8     135 s
#   d512  transformer_deq_d512, transformer_unrolled_d512                        150 s
#
# then every run with a checkpoint is evaluated (python -m deqlm.eval, valid and test, all at once, 60 s) and
# python -m deqlm.eval.report OUT/runs --out OUT/report (30 s) pairs each DEQ with its baseline(s)
# (OUT/report/ptb/pairs.csv). Nothing is tuned here: every setting is fixed in the experiment files.
#
# Budget. 12 epochs (10,000 steps) do not fit: every run trains STEPS=700 steps (784K tokens, 0.84 epochs; 200
# of them the DEQ's 2-layer pretraining), the same number in every row so that widths compare at one token budget
# and the cosine schedule spans the budget actually trained. Sized from the throughput earlier GPU runs logged,
# on an H100 (results/copy/runs/gpu_copy_transformer_*/*/metrics.jsonl, speed/tokens_per_s, 13,440 tokens
# per step, six runs sharing the GPU):
#   - DEQ steps: the slowest DEQ run's median is 160K tokens/s (seed1113), 84 ms a step at Broyden 10/10;
#     x 12/10 for Broyden 12/12 = 101 ms; taken as 150 ms at d_model 128, 165 ms at 256 (three runs share the
#     GPU) and 180 ms at 512 (fp32 matmuls: ~0.9 TFLOP a step, ~30 ms more). Cross-check: results/bench/
#     gpu-speed.md, DEQ-Transformer small alone on the GPU, 3.08 ms per forward and 4.02 ms per adjoint solver
#     step, 12 x 7.1 = 85 ms + embedding, softmax and Adam.
#   - pretraining steps: the copy DEQ's pretraining phase logged 480K tokens/s (28 ms a step); taken as 40 ms.
#   - the baselines are faster than their DEQ (copy: 600K tokens/s, 22 ms a step for 2 layers), so the DEQ sets
#     a row's time.
#   - fixed costs per row: 20 s start-up (python, torch, CUDA context, PTB), 8 s for 3 validations (20K tokens
#     each) and 3 checkpoints.
#   d128: 28 + 200 x 0.04 + 500 x 0.150 = 111 s   -> limit 125 s
#   d256: 28 + 200 x 0.04 + 500 x 0.165 = 119 s   -> limit 135 s
#   d512: 28 + 200 x 0.04 + 500 x 0.180 = 126 s   -> limit 150 s
#   whole study, every limit reached: 10 (env) + 410 (rows) + 60 (eval) + 30 (report) + 5 s of kill grace per
#   phase = 535 s; STUDY_LIMIT (530 s from the start) shortens the last row(s) so that training ends by 430 s,
#   evaluation by 495 s and the report by 530 s: under 9 minutes, with the 10-minute call's start-up to spare.
#   Expected (about 100-120 ms a DEQ step): about 6 minutes.
# A row that reaches its limit gets SIGTERM: the trainer saves last.pt and stops, its best.pt (last validation)
# is evaluated, and the log and OUT/rows.tsv say "timeout"; a failed run says "failed (exit N)". Either way the
# script goes on and keeps whatever finished.
#
# Writes: OUT/env.json (python, torch, CUDA, device, git commit), OUT/nvidia-smi.txt (when nvidia-smi exists),
# OUT/log.txt (progress), OUT/rows.tsv (row, experiment, exit code, seconds, status), OUT/logs/*.log (every
# command's output), OUT/runs/ptb/<experiment>/<stamp>/ (the runs: config, env, metrics.jsonl, eval.json; the
# checkpoints are deleted at the end unless KEEP_CKPT=1, as they are 20-180 MB each), OUT/report/ptb/ (summary,
# pairs.csv, plots). Exit status 0 when every run trained to STEPS and was evaluated and the report was written,
# 1 otherwise (what finished is still there).
#
# --tiny: the same script, the same rows and commands, on the CPU at a tiny size (d_model 16, 20 steps, 1
# thread, evaluation on 1,400 tokens of each split) so tests/test_gpu_width_study.py can run it; only the
# overrides below differ.
#
# Needs data/ptb (make data-ptb; it is git-ignored, so copy it to a GPU machine along with the checkout),
# torch and omegaconf: no virtual environment is created; `python3` (override: PYTHON=...) with PYTHONPATH=src,
# wheels carried in .whl/ installed offline into /tmp/site (see scripts/bench_gpu.sh).
set -u

usage="usage: scripts/gpu_width_study.sh OUT [--tiny]"
OUT=${1:?$usage}
TINY=0
case "${2:-}" in
    "") ;;
    --tiny) TINY=1 ;;
    *) echo "$usage" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
KEEP_CKPT=${KEEP_CKPT:-0}
STUDY_LIMIT=${STUDY_LIMIT:-530}   # seconds from the start to the end of the report
EVAL_LIMIT=60                     # seconds for all evaluations (they run at once)
REPORT_LIMIT=30
GRACE=5                           # seconds between SIGTERM and SIGKILL
STEPS=700
EVAL_EVERY=250
CKPT_EVERY=250
TRAIN_ARGS=()                     # overrides every run gets beyond the above
EVAL_ARGS=()
DEVICE=cuda
if [ "$TINY" = 1 ]; then
    STEPS=20
    EVAL_EVERY=10
    CKPT_EVERY=10
    DEVICE=cpu
    TRAIN_ARGS=(model.d_model=16 model.d_embed=16 model.n_head=2 model.d_head=8 model.d_inner=32
                model.pretrain_steps=10 train.device=cpu train.threads=1 train.eval_max_tokens=1400)
    EVAL_ARGS=(max_tokens=1400)
    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
fi
# row name, time limit (s), experiments
ROWS=(
    "d128 125 transformer_deq_d128 transformer_unrolled_d128"
    "d256 135 transformer_deq_d256 transformer_unrolled_d256 transformer_unrolled_d256_l8"
    "d512 150 transformer_deq_d512 transformer_unrolled_d512"
)

START=$(date +%s)
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT/logs" "$OUT/runs"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "[gpu_width_study $(date +%H:%M:%S) +$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
log "repository $PWD, output $OUT, python $($PYTHON -V 2>&1), tiny=$TINY, $STEPS steps per run"

if ls .whl/*.whl >/dev/null 2>&1 && ! $PYTHON -c "import omegaconf" 2>/dev/null; then
    if [ ! -f /tmp/site/.deqlm-wheels ]; then
        log "installing carried wheels from .whl/ into /tmp/site"
        $PYTHON -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 \
            && touch /tmp/site/.deqlm-wheels || log "wheel install failed (continuing)"
    fi
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

# environment facts: nvidia-smi where there is one, then what torch sees (this also warms the imports)
if command -v nvidia-smi >/dev/null 2>&1; then
    { timeout 10 nvidia-smi; echo
      timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit,compute_mode \
          --format=csv; } > "$OUT/nvidia-smi.txt" 2>&1
fi
timeout 30 "$PYTHON" - "$OUT/env.json" <<'EOF' >>"$LOG" 2>&1
import json, os, platform, subprocess, sys
import torch
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "platform": platform.platform(),
        "cpu_count": os.cpu_count()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update({"device_name": p.name, "device_mem_gib": round(p.total_memory / 2**30, 1),
                 "device_count": torch.cuda.device_count()})
try:
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
    info["git_sha"] = git("rev-parse", "HEAD")
    info["git_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
except OSError:
    pass
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
EOF
[ -s "$OUT/env.json" ] || { log "FATAL: cannot import torch (and write env.json)"; exit 1; }
if [ "$DEVICE" = cuda ] && ! grep -q '"cuda_available": true' "$OUT/env.json"; then
    log "FATAL: no CUDA device visible"
    exit 1
fi
if [ ! -f data/ptb/ptb.train.txt ]; then
    log "FATAL: data/ptb/ptb.train.txt missing (make data-ptb here; carry data/ptb to a GPU machine)"
    exit 1
fi

printf 'row\texperiment\texit\tseconds\tstatus\n' > "$OUT/rows.tsv"
status_of() {  # exit code -> status word
    case "$1" in
        0) echo ok ;;
        124 | 137) echo timeout ;;
        *) echo "failed (exit $1)" ;;
    esac
}
ALL_OK=1
TRAIN_END=$((STUDY_LIMIT - EVAL_LIMIT - REPORT_LIMIT - 2 * GRACE))   # seconds from START
for spec in "${ROWS[@]}"; do
    read -r row limit exps <<<"$spec"
    left=$((TRAIN_END - ($(date +%s) - START) - GRACE))
    if [ "$left" -lt 20 ]; then
        log "row $row: skipped, ${left}s left for training in the study's ${STUDY_LIMIT}s"
        for exp in $exps; do printf '%s\t%s\t-\t0\tskipped\n' "$row" "$exp" >> "$OUT/rows.tsv"; done
        ALL_OK=0
        continue
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    log "row $row: $exps, ${limit}s limit"
    t0=$(date +%s)
    pids=()
    for exp in $exps; do
        timeout -k "$GRACE" "$limit" "$PYTHON" -m deqlm.train "experiments/ptb/gpu/$exp.yaml" \
            train.run_dir="$OUT/runs" train.max_steps="$STEPS" train.eval_every="$EVAL_EVERY" \
            train.ckpt_every="$CKPT_EVERY" log.progress=false log.wandb_mode=disabled ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"} \
            > "$OUT/logs/train-$exp.log" 2>&1 &
        pids+=($!)
    done
    i=0
    for exp in $exps; do
        wait "${pids[$i]}"
        rc=$?
        i=$((i + 1))
        secs=$(($(date +%s) - t0))
        st=$(status_of "$rc")
        [ "$rc" = 0 ] || ALL_OK=0
        printf '%s\t%s\t%s\t%s\t%s\n' "$row" "$exp" "$rc" "$secs" "$st" >> "$OUT/rows.tsv"
        log "  $exp: $st after ${secs}s; $(grep -E 'valid' "$OUT/logs/train-$exp.log" | tail -n 1)"
        [ "$rc" = 0 ] || log "    $(tail -n 1 "$OUT/logs/train-$exp.log")"
    done
done

RUNS=$(find "$OUT/runs" -mindepth 3 -maxdepth 3 -type d | sort)
log "evaluating $(echo "$RUNS" | grep -c .) runs (valid and test, ${EVAL_LIMIT}s)"
EVAL_T0=$(date +%s)
left=$((STUDY_LIMIT - ($(date +%s) - START) - REPORT_LIMIT - 2 * GRACE))
[ "$left" -lt "$EVAL_LIMIT" ] && EVAL_LIMIT=$((left > 10 ? left : 10))
pids=()
for run in $RUNS; do
    if [ ! -d "$run/ckpt" ]; then
        log "  no checkpoint in $run: not evaluated"
        ALL_OK=0
        continue
    fi
    timeout -k "$GRACE" "$EVAL_LIMIT" "$PYTHON" -m deqlm.eval "$run" ${EVAL_ARGS[@]+"${EVAL_ARGS[@]}"} \
        > "$OUT/logs/eval-$(basename "$(dirname "$run")").log" 2>&1 &
    pids+=("$!:$run")
done
for entry in "${pids[@]}"; do
    pid=${entry%%:*}
    run=${entry#*:}
    wait "$pid"
    rc=$?
    if [ "$rc" = 0 ] && [ -f "$run/eval.json" ]; then
        log "  evaluated ${run#"$OUT"/}"
    else
        log "  eval of ${run#"$OUT"/}: $(status_of "$rc")"
        ALL_OK=0
    fi
done
log "evaluation took $(($(date +%s) - EVAL_T0))s"

left=$((STUDY_LIMIT - ($(date +%s) - START) - GRACE))
[ "$left" -lt "$REPORT_LIMIT" ] && REPORT_LIMIT=$((left > 10 ? left : 10))
timeout -k "$GRACE" "$REPORT_LIMIT" "$PYTHON" -m deqlm.eval.report "$OUT/runs" --out "$OUT/report" \
    > "$OUT/logs/report.log" 2>&1
rc=$?
[ -f "$OUT/report/ptb/pairs.csv" ] || ALL_OK=0
log "report: $(status_of "$rc"); $(tail -n 1 "$OUT/logs/report.log")"

if [ "$KEEP_CKPT" != 1 ]; then
    find "$OUT/runs" -type d -name ckpt -prune -exec rm -rf {} +
fi
log "done in $(($(date +%s) - START))s: $(awk -F'\t' 'NR > 1 {print $2 ": " $5}' "$OUT/rows.tsv" | paste -sd ';' -)"
[ "$ALL_OK" = 1 ]
