#!/usr/bin/env bash
# The paper's memory rows and the DEQ / unrolled speed ratios on one CUDA GPU, in under 10 minutes (H100-class).
#
#   scripts/bench_gpu.sh OUTDIR
#
# Writes a flat OUTDIR with at most 8 files:
#   gpu-env.json      device name, torch / CUDA versions, git commit
#   gpu-memory.json   python -m deqlm.bench memory --paper --device cuda --size full   (one object per row and pair)
#   gpu-memory.md     its table (ours next to the paper's, DEQ / unrolled ratios)
#   gpu-speed.json    python -m deqlm.bench speed --device cuda --size full           (one object per pair)
#   gpu-speed.md      its table
#   gpu-log.txt       everything printed, with progress lines
#
# Reliability: every row runs in a fresh process with its own timeout (ROW_TIMEOUT); each phase has a wall-clock
# cap (MEM_BUDGET, SPEED_BUDGET); a failed or timed-out row is recorded as "skipped" with its reason and the run
# goes on; both benchmarks rewrite their JSON after every row / pair, so a phase cut short keeps what it measured.
#
# Dependencies: no virtual environment is created. The script uses `python3` (override: PYTHON=...) with
# PYTHONPATH=src and needs torch (preinstalled on the GPU machine) and omegaconf (+ PyYAML, antlr4 runtime).
# Offline machines: carry wheels in .whl/ at the repository root (e.g. `pip download omegaconf -d .whl` on a
# connected machine; antlr4-python3-runtime ships as an sdist: `pip wheel antlr4-python3-runtime==4.9.3 -w .whl`);
# they are installed with `pip install --no-index --no-deps --target /tmp/site` (dependencies already on the
# machine, e.g. PyYAML, are used as they are) and /tmp/site goes first on PYTHONPATH.
set -u

OUT=${1:?usage: scripts/bench_gpu.sh OUTDIR}
PYTHON=${PYTHON:-python3}
ROW_TIMEOUT=${ROW_TIMEOUT:-120}     # seconds per fresh process (one row)
MEM_BUDGET=${MEM_BUDGET:-300}       # seconds for the whole memory phase
SPEED_BUDGET=${SPEED_BUDGET:-240}   # seconds for the whole speed phase
DEVICE=${DEVICE:-cuda}              # DEVICE=cpu EXTRA=--quick: a seconds-long dry run of this script on any machine
EXTRA=${EXTRA:-}                    # extra arguments for both benchmarks (e.g. --quick)
PHASES=${PHASES:-"memory speed"}    # which phases to run, in this order (scripts/gpu_session.sh runs them apart)

cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu-log.txt"
WORK=$(mktemp -d /tmp/deqlm-bench-gpu.XXXXXX)
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

log() { echo "[bench_gpu $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
touch "$LOG"                        # appended to: gpu_session.sh calls this script once per phase
log "repository $PWD, output $OUT, python $($PYTHON -V 2>&1)"

if ls .whl/*.whl >/dev/null 2>&1; then
    if [ ! -f /tmp/site/.deqlm-wheels ]; then
        log "installing carried wheels from .whl/ into /tmp/site"
        $PYTHON -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 \
            && touch /tmp/site/.deqlm-wheels || log "wheel install failed (continuing)"
    fi
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if ! $PYTHON -c "import torch, omegaconf" >>"$LOG" 2>&1; then
    log "FATAL: cannot import torch and omegaconf (carry wheels in .whl/, see the header of this script)"
    echo "{\"error\": \"cannot import torch and omegaconf\"}" > "$OUT/gpu-env.json"
    exit 1
fi

$PYTHON - "$OUT/gpu-env.json" <<'EOF' 2>>"$LOG"
import json, platform, subprocess, sys
import torch
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "platform": platform.platform()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update({"device_name": p.name, "device_mem_gib": round(p.total_memory / 2**30, 1),
                 "device_count": torch.cuda.device_count()})
try:
    info["git_sha"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    info["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                            capture_output=True, text=True).stdout.strip())
except OSError:
    pass
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
EOF
cat "$OUT/gpu-env.json" >> "$LOG"
if [ "$DEVICE" = cuda ] && ! $PYTHON -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "FATAL: no CUDA device visible"
    exit 1
fi

run_memory() {
log "memory --paper (full size, fresh process per row, ${ROW_TIMEOUT}s each, ${MEM_BUDGET}s in all)"
# shellcheck disable=SC2086
timeout -k 10 "$MEM_BUDGET" $PYTHON -m deqlm.bench memory --paper --device "$DEVICE" --size full \
    --row-timeout "$ROW_TIMEOUT" --no-project --out "$WORK/memory" $EXTRA 2>&1 | tee -a "$LOG"
log "memory phase exit ${PIPESTATUS[0]}"
cp "$WORK/memory/memory.json" "$OUT/gpu-memory.json" 2>/dev/null || log "no memory.json produced"
cp "$WORK/memory/memory.md" "$OUT/gpu-memory.md" 2>/dev/null || true
}

run_speed() {
log "speed (full size, all pairs, ${ROW_TIMEOUT}s per row, ${SPEED_BUDGET}s in all)"
# shellcheck disable=SC2086
timeout -k 10 "$SPEED_BUDGET" $PYTHON -m deqlm.bench speed --device "$DEVICE" --size full --steps 3 --untimed-steps 1 \
    --pairs wt103-transformer-medium-adaptive wt103-trellisnet wt103-transformer-small ptb-trellisnet \
        wt103-transformer-medium wt103-transformer-small-tied wt103-trellisnet-ckpt \
    --row-timeout "$ROW_TIMEOUT" --out "$WORK/speed" $EXTRA 2>&1 | tee -a "$LOG"
log "speed phase exit ${PIPESTATUS[0]}"
cp "$WORK/speed/speed.json" "$OUT/gpu-speed.json" 2>/dev/null || log "no speed.json produced"
cp "$WORK/speed/speed.md" "$OUT/gpu-speed.md" 2>/dev/null || true
}

for phase in $PHASES; do
    case "$phase" in
        memory) run_memory ;;
        speed) run_speed ;;
        *) log "unknown phase '$phase' (expected memory, speed)"; exit 2 ;;
    esac
done

rm -rf "$WORK"
log "done: $(ls "$OUT" | tr '\n' ' ')"
