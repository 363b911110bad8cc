#!/usr/bin/env bash
# Sharded training on GPUs, checked end to end with `soarflow train` on the tiny SD3 pipeline of
# tests/diffusers_testing.py (seconds per run): FSDP2 (configs/accelerate/fsdp_8gpu.yaml) and, where the
# `deepspeed` package is installed, DeepSpeed ZeRO-2 and ZeRO-3 (configs/accelerate/deepspeed_zero{2,3}_8gpu.yaml),
# each with every visible GPU as one process, bf16 mixed precision.
#
#   bash bench/gpu_fsdp_check.sh          # writes logs and summary.txt into $OUT if set, else /tmp/gpu_fsdp_check
#   GPU_CHECK_CPU_SMOKE=1 bash bench/gpu_fsdp_check.sh   # no GPU: the same runs as one CPU process (plumbing only)
#
# Per backend: a full fine-tune (4 steps, checkpoints at 2 and 4, validation at 4, EMA except under ZeRO-3) that is
# then resumed from checkpoint-2 into a new folder and must end on the same weights; the saved transformer must load
# into StableDiffusion3Pipeline and generate; a LoRA run whose adapters load with `load_lora_weights`.
# Prints one PASS / FAIL / SKIP line per check and exits 1 if any check failed. CPUs can check FSDP2 only through
# tests/train/test_fsdp.py and tests/models/test_sd3_fsdp.py (accelerate turns FSDP into DDP on CPUs); DeepSpeed
# needs GPUs.
set -u
cd "$(dirname "$0")/.."
DEST="${OUT:-/tmp/gpu_fsdp_check}"
mkdir -p "$DEST"
WORK="$DEST/work"
rm -rf "$WORK"
mkdir -p "$WORK"
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$DEST/summary.txt"
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

NGPU="$($PY -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
SMOKE="${GPU_CHECK_CPU_SMOKE:-0}"
if [ "$NGPU" = 0 ] && [ "$SMOKE" != 1 ]; then
  say "SKIP all: no GPU visible (set GPU_CHECK_CPU_SMOKE=1 to run the plumbing on one CPU process)"
  exit 0
fi

$PY - "$WORK" <<'EOF' || { say "FAIL setup: building the tiny SD3 pipeline"; exit 1; }
import sys
from pathlib import Path
from diffusers_testing import build_tiny_sd3_pipeline, make_imagefolder
work = Path(sys.argv[1])
build_tiny_sd3_pipeline(work / "pipe", variant="sd3")
make_imagefolder(work / "imgs", sizes=((32, 32),))
EOF

common() {  # $1 output dir, $2 finetune, $3 ema flag (or ""): sets ARGS
  ARGS=(--task sd3 --method soar --output_dir "$1" --train_batch_size 1 --max_train_steps 4
    --checkpointing_steps 2 --validation_steps 4 --report_to none --show_progress false --learning_rate 1e-3
    --max_grad_norm 1.0 --gradient_accumulation_steps 1 --soar.num_aux 2 --soar.rollout_steps 3
    --model.pretrained="$WORK/pipe" --model.max_sequence_length=8 --model.finetune="$2" "--model.lora={rank: 4, alpha: 8}"
    --data.path="$WORK/imgs" --data.resolution=32 --data.validation_num_steps=2 "--data.validation_prompts=['a red circle']")
  if [ -n "$3" ]; then ARGS+=("$3"); fi
}

train() {  # $1 accelerate config, then soarflow train arguments; log in $LOGFILE
  if [ "$NGPU" = 0 ]; then
    ACCELERATE_USE_CPU=1 timeout 600 "$PY" -m soarflow train "${@:2}" >>"$LOGFILE" 2>&1
  else
    timeout 600 "$PY" -m accelerate.commands.launch --config_file "$1" --num_processes "$NGPU" --num_machines 1 \
      -m soarflow train --mixed_precision bf16 "${@:2}" >>"$LOGFILE" 2>&1
  fi
}

check_backend() {  # $1 name, $2 accelerate config, $3 EMA flag
  local name="$1" cfg="$2" ema="$3" out="$WORK/$1"
  LOGFILE="$DEST/$name.log"
  : >"$LOGFILE"
  common "$out/full" full "$ema"
  if train "$cfg" "${ARGS[@]}"; then
    common "$out/resumed" full "$ema"
    if train "$cfg" "${ARGS[@]}" --resume_from_checkpoint "$out/full/checkpoint-2"; then
      if $PY - "$WORK/pipe" "$out/full/model" "$out/resumed/model" >>"$LOGFILE" 2>&1 <<'EOF'
import sys
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
pipe_dir, full, resumed = sys.argv[1:]
a = SD3Transformer2DModel.from_pretrained(full + "/transformer").state_dict()
b = SD3Transformer2DModel.from_pretrained(resumed + "/transformer").state_dict()
worst = max(((a[k].float() - b[k].float()).abs().max() / (a[k].float().abs().max() + 1e-8)).item() for k in a)
print("resume: max relative difference", worst)
assert worst < 1e-2, worst
t = SD3Transformer2DModel.from_pretrained(full + "/transformer")
pipe = StableDiffusion3Pipeline.from_pretrained(pipe_dir, transformer=t)
img = pipe("a red circle", num_inference_steps=2, height=32, width=32, max_sequence_length=8, output_type="pt").images
assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()
EOF
      then say "PASS $name full: trains, resumes to the same weights, saved transformer loads into the pipeline"
      else say "FAIL $name full: resumed weights or pipeline load (see $LOGFILE)"; fi
    else say "FAIL $name full resume (see $LOGFILE)"; fi
  else say "FAIL $name full fine-tune (see $LOGFILE)"; fi

  common "$out/lora" lora "$ema"
  if train "$cfg" "${ARGS[@]}" && $PY - "$WORK/pipe" "$out/lora/model" >>"$LOGFILE" 2>&1 <<'EOF'
import sys
import torch
from diffusers import StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained(sys.argv[1])
pipe.load_lora_weights(sys.argv[2])
img = pipe("a dog", num_inference_steps=2, height=32, width=32, max_sequence_length=8, output_type="pt").images
assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()
EOF
  then say "PASS $name lora: trains, adapters load with load_lora_weights"
  else say "FAIL $name lora (see $LOGFILE)"; fi
}

say "gpus: $NGPU ($($PY -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu smoke")' 2>/dev/null))"
check_backend fsdp2 configs/accelerate/fsdp_8gpu.yaml --use_ema
if $PY -c 'import deepspeed' >/dev/null 2>&1 && [ "$NGPU" != 0 ]; then
  check_backend zero2 configs/accelerate/deepspeed_zero2_8gpu.yaml --use_ema
  check_backend zero3 configs/accelerate/deepspeed_zero3_8gpu.yaml ""   # use_ema is refused under ZeRO-3
else
  say "SKIP zero2, zero3: the deepspeed package is not installed or there is no GPU (pip install deepspeed)"
fi
! grep -q '^FAIL' "$SUMMARY"
