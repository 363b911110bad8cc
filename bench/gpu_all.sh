#!/usr/bin/env bash
# All GPU measurements of docs/performance.md in one short run (~8 min on one H100/H200), for a fresh machine
# that holds only a copy of the repository.
#
#   bash bench/gpu_all.sh            # writes into $OUT if set (the device tool's folder), else docs/perf/
#
# Each part has its own timeout and writes its JSON as it goes, so a part that fails or runs out of time still
# leaves what it measured. Missing Python packages are pip-installed without touching an installed CUDA torch.
set -u
cd "$(dirname "$0")/.."
DEST="${OUT:-docs/perf}"
mkdir -p "$DEST"
LOG="$DEST/gpu_all.log"
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

log "python: $($PY --version 2>&1)"
# torch: keep an installed CUDA build; install one only when there is no torch at all.
if ! $PY -c 'import torch' >/dev/null 2>&1; then
  log "no torch: pip install torch (may fail without an index)"
  timeout 240 $PY -m pip install -q torch >>"$LOG" 2>&1 || log "pip install torch failed"
fi
# the rest of the stack, each only if missing; --no-deps would break diffusers, so pin torch as already installed
TORCH_VER="$($PY -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo)"
for mod in diffusers peft accelerate safetensors yaml bitsandbytes; do
  if ! $PY -c "import $mod" >/dev/null 2>&1; then
    pkg="$mod"; [ "$mod" = yaml ] && pkg=pyyaml
    log "pip install $pkg"
    if [ -n "$TORCH_VER" ]; then
      timeout 180 $PY -m pip install -q "$pkg" "torch==$TORCH_VER" >>"$LOG" 2>&1 || log "pip install $pkg failed"
    else
      timeout 180 $PY -m pip install -q "$pkg" >>"$LOG" 2>&1 || log "pip install $pkg failed"
    fi
  fi
done

$PY - >"$DEST/env.json" 2>>"$LOG" <<'EOF'
import json, platform, subprocess, time
info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(), "host": platform.node()}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                device_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30
                if torch.cuda.is_available() else None)
except Exception as err:  # noqa: BLE001
    info["torch_error"] = repr(err)
for mod in ("diffusers", "peft", "accelerate", "bitsandbytes"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as err:  # noqa: BLE001
        info[mod] = f"missing ({type(err).__name__})"
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                         "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except Exception:  # noqa: BLE001
    pass
print(json.dumps(info, indent=1))
EOF
log "env: $(tr -d '\n' <"$DEST/env.json")"

# 1. step cost (small model): layouts vs loop, SOAR/SFT vs the FLOP floor, peak memory. ~1 min.
log "step_cost.py --device cuda"
timeout 150 $PY bench/step_cost.py --device cuda --repeats 7 --out "$DEST/step_cost_cuda.json" \
  2>&1 | tee "$DEST/step_cost_cuda.txt" | tee -a "$LOG"
log "step_cost exit ${PIPESTATUS[0]}"

# 2. full-size SD3.5-M and FLUX.1-dev: SD3.5-M 512 px first, then FLUX LoRA, then the rest, inside 330 s.
log "scale.py (full size)"
timeout 390 $PY bench/scale.py --device cuda --resolutions 512,1024 --ks 1,2,4,6 --aux-chunks none,1 \
  --max-seconds 330 --out "$DEST/scale_cuda.json" 2>&1 | tee "$DEST/scale_cuda.txt" | tee -a "$LOG"
log "scale exit ${PIPESTATUS[0]}"

# 3. the demo, timed: its --quick smoke run (accelerate puts it on the GPU); the full demo does not fit here.
log "soarflow demo --quick (timed)"
start=$(date +%s)
timeout 120 $PY -m soarflow.cli demo --quick --output_dir "$DEST/demo_quick" >"$DEST/demo_cuda.txt" 2>&1
log "demo exit $? after $(( $(date +%s) - start )) s"
log "done; files in $DEST"
ls -l "$DEST" | tee -a "$LOG"
