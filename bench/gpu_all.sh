#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md in one prepared command, for one H100/H200 and ~10 minutes:
#
#   bash bench/gpu_all.sh                 # on the GPU machine; results in $OUT (the device tool's folder) or ./gpu_out
#   bash bench/gpu_all.sh --tiny          # the same sections with tiny models on the CPU (~1.5 min of CPU);
#                                         # also SOARFLOW_GPU_TINY=1. tests/bench/test_gpu_all.py runs its env,
#                                         # claim, layout and fsdp sections in CI; test_scale.py the scale options.
#
# Sections, in order of importance (each under its own timeout, all under GPU_TOTAL_S):
#   env     versions, GPU name and memory                                     -> env.json
#   claim   the powered claim study: bench/gpu_claim_study.sh if this checkout has it, with OUT=<work>/claim_study,
#           STUDY_DEVICE, and STUDY_MAX_SECONDS / STUDY_HARD_SECONDS set inside the budget (tiny: STUDY_ARGS=--quick);
#           its cells.tar.gz and report.md come back as claim_cells.tar.gz, claim_report.md   (GPU_CLAIM_S, 210 s)
#   layout  bench/step_cost.py: the default (auto) layout against reuse, fused and loop, with the loss
#           difference of the layouts on fixed draws                           (GPU_LAYOUT_S, default 40 s)
#   scale   bench/scale.py, random weights built from the published configs (nothing downloaded), in parts:
#           A  SD3.5-M 512 px, batch 4, full fine-tune (the release's recipe), AdamW and 8-bit AdamW:
#              SFT, SOAR K=6 (default layout and reuse) and the official loop (bench/official_loop.py)
#              -> SOAR/SFT, soarflow/official, and whether the default layout is the fastest at full size
#           B  FLUX.1-dev 512 px, batch 1, LoRA: SFT, SOAR K=6, official
#           Q  LoRA on a quantized base (model.quantize_base, bitsandbytes nf4; skipped with a message where this
#              checkout lacks the key): SD3.5-M, then FLUX.1-dev, 512 px, batch 1
#           C  the rest: 512 and 1024 px, batch 1 and 4, LoRA and full, both models, SFT and SOAR K=6
#                                                                              (GPU_SCALE_S, default 230 s)
#   fsdp    bench/gpu_fsdp_check.sh (branch issue-fsdp) if this checkout has it; on a CPU with
#           GPU_CHECK_CPU_SMOKE=1                                              (GPU_FSDP_S, default 50 s)
#
# What comes back (the device tool returns at most 8 files): gpu_all.log, gpu_summary.md, gpu_summary.json,
# gpu_all.tar.gz (every section's files, weights left out), rewritten after every section, so a run cut short
# still returns what it measured, and the claim study's claim_cells.tar.gz and claim_report.md. Work files live
# in GPU_WORK (default /tmp/soarflow_gpu_work).
#
# Environment: OUT, GPU_SECTIONS (default env,claim,layout,scale,fsdp), GPU_TOTAL_S (default 560),
# GPU_CLAIM_S, GPU_LAYOUT_S, GPU_SCALE_S, GPU_FSDP_S, GPU_DEVICE (default cuda; cpu in tiny mode), PYTHON.
#
# Packages: the GPU image has torch, accelerate, peft and transformers but no diffusers or bitsandbytes, and
# nothing can be fetched there. Carry them as wheels in .whl/ (ignored by git: .gitignore lists /.whl/),
# downloaded here once with exactly:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#     -d .whl bitsandbytes==0.50.2 diffusers==0.42.1
#   zip -q -d .whl/bitsandbytes-0.50.2-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' \
#     'bitsandbytes/libbitsandbytes_rocm*'      # keep the CUDA 13 libraries: 43 MB -> 7.4 MB
#
# (diffusers needs nothing else the image lacks on Python 3.12.) Then run it with the device tool as
#   run(command="bash bench/gpu_all.sh", carry=[".whl"], timeout_s=600)
# This script installs .whl/*.whl into /tmp/site (pip --no-index) when the folder is there.
set -u
cd "$(dirname "$0")/.."
REPO="$PWD"

TINY="${SOARFLOW_GPU_TINY:-0}"
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1 ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | grep '^#'; exit 0 ;;
    *) echo "bench/gpu_all.sh: unknown argument '$arg' (use --tiny, or environment variables; --help)" >&2; exit 2 ;;
  esac
done

DEST="${OUT:-$REPO/gpu_out}"
WORK="${GPU_WORK:-/tmp/soarflow_gpu_work}"
SECTIONS=",${GPU_SECTIONS:-env,claim,layout,scale,fsdp},"
for s in $(echo "$SECTIONS" | tr ',' ' '); do
  case "$s" in env|claim|layout|scale|fsdp) ;; *)
    echo "bench/gpu_all.sh: GPU_SECTIONS: unknown section '$s' (choose from env,claim,layout,scale,fsdp)" >&2; exit 2 ;;
  esac
done
if [ "$TINY" = 1 ]; then
  DEVICE="${GPU_DEVICE:-cpu}"
  TOTAL_S="${GPU_TOTAL_S:-300}"; CLAIM_S="${GPU_CLAIM_S:-60}"; LAYOUT_S="${GPU_LAYOUT_S:-60}"
  SCALE_S="${GPU_SCALE_S:-150}"; FSDP_S="${GPU_FSDP_S:-60}"
else
  DEVICE="${GPU_DEVICE:-cuda}"
  TOTAL_S="${GPU_TOTAL_S:-560}"; CLAIM_S="${GPU_CLAIM_S:-210}"; LAYOUT_S="${GPU_LAYOUT_S:-40}"
  SCALE_S="${GPU_SCALE_S:-230}"; FSDP_S="${GPU_FSDP_S:-50}"
fi
mkdir -p "$DEST" "$WORK"
LOG="$DEST/gpu_all.log"
: >"$LOG"
: >"$WORK/sections.tsv"
START=$(date +%s)
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
want() { case "$SECTIONS" in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
# seconds a section may take: its budget, cut to what is left of GPU_TOTAL_S (at least 1)
budget() { local left=$(( TOTAL_S - ($(date +%s) - START) )); [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >>"$WORK/sections.tsv"; log "section $1: exit $2 after $3 s ${4:-}"; }

# the summary and the tarball, rewritten after every section (what comes back if the run is cut short)
finish() {
  "$PY" bench/gpu_report.py "$WORK" --out "$DEST/gpu_summary.json" --markdown "$DEST/gpu_summary.md" \
    >/dev/null 2>>"$LOG" || log "gpu_report.py failed"
  tar -czf "$DEST/gpu_all.tar.gz.tmp" -C "$WORK" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' \
    --exclude='*.ckpt' . 2>>"$LOG" && mv "$DEST/gpu_all.tar.gz.tmp" "$DEST/gpu_all.tar.gz"
}

export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >>"$LOG" 2>&1; then
    export PYTHONPATH="$REPO/src:/tmp/site${PYTHONPATH#"$REPO/src"}"
    log "installed $(ls .whl | tr '\n' ' ')into /tmp/site"
  else
    log "pip install of .whl/*.whl failed (see above); going on without them"
  fi
fi
log "bench/gpu_all.sh: tiny=$TINY device=$DEVICE sections=${SECTIONS:1:-1} total budget ${TOTAL_S}s dest=$DEST"

# ------------------------------------------------------------------------------------------------ env
if want env; then
  t0=$(date +%s)
  "$PY" - >"$WORK/env.json" 2>>"$LOG" <<'EOF'
import json, platform, subprocess, time
info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(), "host": platform.node()}
try:
    import torch
    cuda = torch.cuda.is_available()
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=cuda,
                device=torch.cuda.get_device_name(0) if cuda else None,
                device_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None)
except Exception as err:  # noqa: BLE001
    info["torch_error"] = repr(err)
for mod in ("diffusers", "peft", "accelerate", "transformers", "bitsandbytes"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as err:  # noqa: BLE001
        info[mod] = f"missing ({type(err).__name__})"
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                         "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except Exception:  # noqa: BLE001
    info["nvidia_smi"] = ""
print(json.dumps(info, indent=1))
EOF
  rc=$?
  log "env: $(tr -d '\n' <"$WORK/env.json")"
  record env "$rc" $(( $(date +%s) - t0 ))
  finish
fi

# ---------------------------------------------------------------------------------------------- claim
if want claim; then
  t0=$(date +%s)
  if [ -f bench/gpu_claim_study.sh ]; then
    t=$(budget "$CLAIM_S")
    # the study stops itself inside the budget: no cell starts after STUDY_MAX_SECONDS, the rest is stopped at
    # STUDY_HARD_SECONDS (SIGTERM, SIGKILL 20 s later), leaving ~25 s for its start and its archive. Its own
    # `timeout` runs in another process group, out of reach of this one's, which is only a backstop.
    shard=$(( t - 45 > 10 ? t - 45 : 10 )); smax=$(( t * 6 / 10 < shard - 5 ? t * 6 / 10 : shard - 5 ))
    study_args="${STUDY_ARGS:-}"; jobs="${STUDY_JOBS:-8}"; cells="${CELLS_DIR:-}"
    if [ "$TINY" = 1 ]; then  # one worker, --quick, and cells kept out of the committed cache
      [ -z "$study_args" ] && study_args="--quick"
      jobs="${STUDY_JOBS:-1}"; cells="${CELLS_DIR:-$WORK/claim_cells}"
    fi
    log "claim: bash bench/gpu_claim_study.sh (STUDY_MAX_SECONDS=$smax STUDY_HARD_SECONDS=$shard, timeout ${t}s)"
    env OUT="$WORK/claim_study" STUDY_DEVICE="${STUDY_DEVICE:-$DEVICE}" STUDY_MAX_SECONDS="$smax" \
      STUDY_HARD_SECONDS="$shard" STUDY_ARGS="$study_args" STUDY_JOBS="$jobs" ${cells:+CELLS_DIR="$cells"} \
      SOARFLOW_GPU_TINY="$TINY" GPU_DEVICE="$DEVICE" \
      timeout --kill-after=10 "$t" bash bench/gpu_claim_study.sh >"$WORK/claim_study.log" 2>&1
    rc=$?
    tail -n 20 "$WORK/claim_study.log" | tee -a "$LOG"
    # the study's cell archive and report come back beside the summary (unpack: docs/study.md)
    [ -f "$WORK/claim_study/cells.tar.gz" ] && cp "$WORK/claim_study/cells.tar.gz" "$DEST/claim_cells.tar.gz"
    [ -f "$WORK/claim_study/report.md" ] && cp "$WORK/claim_study/report.md" "$DEST/claim_report.md"
    record claim "$rc" $(( $(date +%s) - t0 )) "$([ "$rc" = 124 ] && echo "stopped at its ${t}s timeout")"
  else
    record claim skipped 0 "bench/gpu_claim_study.sh is not in this checkout (branch issue-runner)"
  fi
  finish
fi

# --------------------------------------------------------------------------------------------- layout
if want layout; then
  t0=$(date +%s)
  t=$(budget "$LAYOUT_S")
  if [ "$TINY" = 1 ]; then
    args=(--model generic --batch 2 --ks 1 --repeats 1 --variants default,reuse,fused,loop --threads 1)
  else
    args=(--model mmdit --batch 16 --ks 1,6 --repeats 5 --variants default,reuse,fused,loop)
  fi
  log "layout: bench/step_cost.py --device $DEVICE ${args[*]} (timeout ${t}s)"
  timeout --kill-after=10 "$t" "$PY" bench/step_cost.py --device "$DEVICE" "${args[@]}" --out "$WORK/step_cost.json" \
    >"$WORK/step_cost.txt" 2>&1
  rc=$?
  cat "$WORK/step_cost.txt" | grep -v Warning | tee -a "$LOG"
  record layout "$rc" $(( $(date +%s) - t0 ))
  finish
fi

# ---------------------------------------------------------------------------------------------- scale
if want scale; then
  if [ "$TINY" = 1 ]; then
    common=(--device "$DEVICE" --scale 0.04 --text-len 8 --ks 2 --steps 1 --grad-ckpt 1)
    LO=64; HI=128; OPTS=adamw; QUANT=torchao:int8; B4=2
  else
    common=(--device "$DEVICE" --ks 6 --steps 3 --case-seconds 4 --grad-ckpt 1)
    LO=512; HI=1024; OPTS=adamw,adamw8bit; QUANT=bitsandbytes:nf4; B4=4
  fi
  # part name | share of the scale budget (%) | arguments
  parts=(
    "A|30|--archs sd3m --resolutions $LO --batches $B4 --finetune full --optimizers $OPTS --official --layouts auto,reuse"
    "B|25|--archs flux --resolutions $LO --batches 1 --finetune lora --optimizers adamw --official"
    "Q|15|--archs sd3m,flux --resolutions $LO --batches 1 --finetune lora --optimizers adamw --quantize-base $QUANT"
    "C|30|--archs sd3m,flux --resolutions $LO,$HI --batches 1,$B4 --finetune lora,full --optimizers adamw"
  )
  for part in "${parts[@]}"; do
    IFS='|' read -r name share pargs <<<"$part"
    t0=$(date +%s)
    t=$(budget $(( SCALE_S * share / 100 )))
    # bench/scale.py stops starting configurations at --max-seconds; the rest of the timeout is for the last one
    maxs=$(( t * 2 / 3 > 1 ? t * 2 / 3 : 1 ))
    log "scale part $name: bench/scale.py ${common[*]} $pargs --max-seconds $maxs (timeout ${t}s)"
    # shellcheck disable=SC2086 # pargs is a list of arguments
    timeout --kill-after=10 "$t" "$PY" bench/scale.py "${common[@]}" $pargs --max-seconds "$maxs" \
      --out "$WORK/scale_$name.json" >"$WORK/scale_$name.txt" 2>&1
    rc=$?
    grep -v -i "warn\|deprecat" "$WORK/scale_$name.txt" | tail -n 40 | tee -a "$LOG"
    record "scale_$name" "$rc" $(( $(date +%s) - t0 )) "$([ "$rc" = 124 ] && echo "stopped at its ${t}s timeout")"
    # a quantized base part that quantized nothing because the key is unknown says so once
    if [ "$name" = Q ] && grep -q "model.quantize_base is unknown" "$WORK/scale_$name.txt"; then
      log "scale part Q: skipped: model.quantize_base is unknown in this checkout (branch issue-memory)"
    fi
    finish
  done
fi

# ----------------------------------------------------------------------------------------------- fsdp
if want fsdp; then
  t0=$(date +%s)
  if [ -f bench/gpu_fsdp_check.sh ]; then
    t=$(budget "$FSDP_S")
    log "fsdp: bash bench/gpu_fsdp_check.sh (timeout ${t}s)"
    smoke=0; [ "$DEVICE" = cpu ] && smoke=1  # the script's CPU plumbing run (one process)
    OUT="$WORK/fsdp" GPU_CHECK_CPU_SMOKE="${GPU_CHECK_CPU_SMOKE:-$smoke}" SOARFLOW_GPU_TINY="$TINY" GPU_DEVICE="$DEVICE" \
      timeout --kill-after=10 "$t" bash bench/gpu_fsdp_check.sh >"$WORK/fsdp.log" 2>&1
    rc=$?
    tail -n 20 "$WORK/fsdp.log" | tee -a "$LOG"
    record fsdp "$rc" $(( $(date +%s) - t0 )) "$([ "$rc" = 124 ] && echo "stopped at its ${t}s timeout")"
  else
    record fsdp skipped 0 "bench/gpu_fsdp_check.sh is not in this checkout (branch issue-fsdp)"
  fi
  finish
fi

finish
log "done after $(( $(date +%s) - START )) s; files in $DEST"
cat "$DEST/gpu_summary.md" 2>/dev/null
ls -l "$DEST" | tee -a "$LOG"
