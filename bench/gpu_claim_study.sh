#!/usr/bin/env bash
# The powered claim study on one GPU, in at most ~9 minutes of a fresh machine that holds only a copy of the
# repository (the device tool's 10-minute command limit):
#
#   bash bench/gpu_claim_study.sh                 # writes into $OUT if set (the device tool's folder), else runs/
#   STUDY_CONFIG=configs/study_claim_focus.yaml bash bench/gpu_claim_study.sh     # another study file
#
# What it runs:
#   soarflow study --config $STUDY_CONFIG --device cuda --jobs $STUDY_JOBS --cells_dir $CELLS_DIR \
#       --output_dir $STUDY_OUTPUT_DIR --max_seconds $STUDY_MAX_SECONDS --no_estimate
# under `timeout $STUDY_HARD_SECONDS`. Cells already in $CELLS_DIR (committed: docs/results/<study>/cells) are
# reused, so rerunning the script continues where the last run stopped. No cell starts after
# $STUDY_MAX_SECONDS (nor one that a finished cell of its row says would end after it); running cells finish;
# the hard timeout stops whatever is still running (SIGTERM, then SIGKILL 20 s later), keeping finished cells.
#
# What comes back in $OUT (at most 8 files, no deeper than 2 folders):
#   cells.tar.gz           the cells folder (every finished cell, compact JSON, no weights): unpack it over the
#                          repository with  tar -xzf cells.tar.gz -C docs/results/<study>/  and commit it
#   report.md results.json the report, when every cell of the study is finished (else: rerun the script)
#   study.log              the study's progress lines;  gpu.csv  GPU utilisation / memory every 5 s;  env.json
#
# Environment (defaults): STUDY_CONFIG (configs/study_claim_powered.yaml), STUDY_JOBS (8: the 3M-parameter U-Net
# leaves one GPU launch-bound, so 8 cells share it, each in its own process and CUDA context), STUDY_MAX_SECONDS
# (400), STUDY_HARD_SECONDS (500), CELLS_DIR (docs/results/<config stem>/cells), STUDY_OUTPUT_DIR (a scratch
# folder outside $OUT: run folders and weights need not come back), STUDY_DEVICE (cuda; cpu for a smoke test of
# this script without a GPU), STUDY_ARGS (more study flags, e.g. --quick).
set -u
cd "$(dirname "$0")/.."
CONFIG="${STUDY_CONFIG:-configs/study_claim_powered.yaml}"
NAME="$(basename "$CONFIG" .yaml)"
JOBS="${STUDY_JOBS:-8}"
DEVICE="${STUDY_DEVICE:-cuda}"
MAX="${STUDY_MAX_SECONDS:-400}"
HARD="${STUDY_HARD_SECONDS:-500}"
CELLS="${CELLS_DIR:-docs/results/$NAME/cells}"
DEST="${OUT:-runs/gpu_$NAME}"
WORK="${STUDY_OUTPUT_DIR:-/tmp/soarflow_gpu_$NAME}"
mkdir -p "$DEST" "$CELLS"
LOG="$DEST/study.log"
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

if [ ! -f "$CONFIG" ]; then
  log "study file $CONFIG not found (set STUDY_CONFIG)"; exit 2
fi
$PY - >"$DEST/env.json" 2>>"$LOG" <<'EOF'
import json, os, platform, time
info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(), "cpus": os.cpu_count()}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
except Exception as err:  # noqa: BLE001
    info["torch_error"] = repr(err)
for mod in ("accelerate", "safetensors", "yaml", "PIL"):
    try:
        info[mod] = getattr(__import__(mod), "__version__", "present")
    except Exception as err:  # noqa: BLE001
        info[mod] = f"missing ({type(err).__name__})"
print(json.dumps(info, indent=1))
EOF
log "env: $(tr -d '\n' <"$DEST/env.json")"
log "cells in $CELLS before the run: $(ls "$CELLS" | grep -c '\.json$')"

SMI=""
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,memory.total --format=csv -l 5 >"$DEST/gpu.csv" 2>/dev/null &
  SMI=$!
fi
log "soarflow study --config $CONFIG --device $DEVICE --jobs $JOBS --cells_dir $CELLS --max_seconds $MAX ${STUDY_ARGS:-} (hard stop ${HARD}s)"
start=$(date +%s)
timeout --signal=TERM --kill-after=20 "$HARD" \
  $PY -m soarflow study --config "$CONFIG" --device "$DEVICE" --jobs "$JOBS" --cells_dir "$CELLS" \
  --output_dir "$WORK" --max_seconds "$MAX" --no_estimate ${STUDY_ARGS:-} >>"$LOG" 2>&1
rc=$?
log "study exit status $rc after $(( $(date +%s) - start )) s (0: all cells done; 1: some failed; 75: cells left, rerun; 124/137: hard stop)"
[ -n "$SMI" ] && kill "$SMI" 2>/dev/null
log "cells in $CELLS after the run: $(ls "$CELLS" | grep -c '\.json$')"
for f in report.md results.json; do
  [ -f "$WORK/$f" ] && cp "$WORK/$f" "$DEST/$f"
done
tar -czf "$DEST/cells.tar.gz" -C "$(dirname "$CELLS")" "$(basename "$CELLS")" && \
  log "cells.tar.gz: $(du -k "$DEST/cells.tar.gz" | cut -f1) KiB (unpack: tar -xzf cells.tar.gz -C $(dirname "$CELLS")/)"
exit "$rc"
