#!/usr/bin/env bash
# Train a run of record from a clean checkout of one commit, so that its env.json names the code that ran.
#
#   scripts/run_of_record.sh COMMIT EXPERIMENT.yaml [key=value ...]
#   scripts/run_of_record.sh collect RUN_DIR DEST      # copy a finished run's small files into DEST/
#
# Training: checks out COMMIT as a git worktree in $RUNS_ROOT/run-<short sha> (default: next to this
# checkout), links this checkout's prepared corpora (data/*) into it, and trains there with this checkout's
# Python (.venv, else python3), one thread, the package imported from the worktree's src/. The run folder is
# <worktree>/results/runs/<corpus>/<experiment>/<stamp>/ (printed first by the trainer).
# Collecting: copies config.yaml, env.json, any code*.patch, metrics.jsonl, eval.json and solver_caps.json,
# never checkpoints, into DEST/<experiment>/<stamp>/ (results/<corpus>/runs/ for a run of record).
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
die() { echo "error: $*" >&2; exit 2; }

if [[ "${1:-}" == "collect" ]]; then
    [[ $# -eq 3 ]] || die "usage: $0 collect RUN_DIR DEST"
    run="${2%/}"
    [[ -f "$run/config.yaml" && -f "$run/env.json" ]] ||
        die "$run: not a run folder (no config.yaml or env.json)"
    dest="$3/$(basename "$(dirname "$run")")/$(basename "$run")"
    mkdir -p "$dest"
    for f in config.yaml env.json metrics.jsonl eval.json solver_caps.json "$run"/env-resume-*.json \
            "$run"/code*.patch; do
        f="$(basename "$f")"
        [[ -f "$run/$f" ]] && cp "$run/$f" "$dest/$f"
    done
    echo "$dest"
    exit 0
fi

[[ $# -ge 2 ]] || die "usage: $0 COMMIT EXPERIMENT.yaml [key=value ...] (or: $0 collect RUN_DIR DEST)"
commit="$1"; exp="$2"; shift 2
sha="$(git -C "$here" rev-parse --verify --quiet "$commit^{commit}")" || die "$commit: not a commit of $here"
short="${sha:0:7}"
tree="${RUNS_ROOT:-$(dirname "$here")}/run-$short"
if [[ ! -d "$tree" ]]; then
    git -C "$here" worktree add --detach --quiet "$tree" "$sha"
fi
[[ "$(git -C "$tree" rev-parse HEAD)" == "$sha" ]] || die "$tree is not at $sha"
[[ -z "$(git -C "$tree" status --porcelain)" ]] || die "$tree has changes: a run of record needs a clean tree"
git -C "$tree" cat-file -e "$sha:$exp" 2>/dev/null || die "$exp: not a file of commit $short"
for corpus in "$here"/data/*/; do
    name="$(basename "$corpus")"
    [[ -e "$tree/data/$name" ]] || ln -s "$corpus" "$tree/data/$name"
done
py="$here/.venv/bin/python"
[[ -x "$py" ]] || py="$(command -v python3)"
cd "$tree"
OMP_NUM_THREADS=1 PYTHONPATH="$tree/src" exec "$py" -m deqlm.train "$exp" "$@"
