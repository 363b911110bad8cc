#!/usr/bin/env bash
# Architecture / noise-level comparison for the embedded base (docs/base_model.md), all candidates trained with
# the same `soarflow pretrain` recipe and step count, in parallel on one GPU (small models leave it mostly idle).
# Usage: bash bench/pretrain_sweep.sh OUT_DIR [STEPS]   (CPU works too, but takes hours)
set -u
out=${1:?usage: pretrain_sweep.sh OUT_DIR [STEPS] [MAX_SECONDS]}; steps=${2:-4000}; secs=${3:-100000}
mkdir -p "$out"
py=${PYTHON:-python3}
run() {  # name, extra args...
  local name=$1; shift
  PYTHONPATH=src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 $py -m soarflow pretrain --output_dir "$out/$name" \
    --max_train_steps "$steps" --max_train_seconds "$secs" --dataloader_num_workers 2 "$@" > "$out/$name.log" 2>&1 &
}
mix="--logit_mean 0.3 --uniform_fraction 0.25"
ln="--logit_mean 0 --uniform_fraction 0"  # the old default: logit-normal(0, 1) only
run mmdit_ln    --architecture mmdit $ln
run mmdit_mix   --architecture mmdit $mix
run mmdit_p2w   --architecture mmdit --patch_size 2 --hidden_size 128 $mix
run unet_ln     --architecture unet $ln
run unet_mix    --architecture unet $mix
run unet_mix_r2 --architecture unet --num_res_blocks 2 $mix
# the MMDiT's CPU step is ~6x cheaper than the U-Net's: also give it about the U-Net's CPU wall-clock
run mmdit_mix_3x --architecture mmdit $mix --max_train_steps $((3 * steps))
wait
for d in "$out"/*/; do  # one sample sheet per model: the first image of 2 prompts per family
  [ -f "$d/model.safetensors" ] && PYTHONPATH=src $py -m soarflow eval-shapes --checkpoint "$d/model.safetensors" \
    --prompts_per_family 2 --images_per_prompt 2 --seed 5 --sheet "$d/sheet.png" > /dev/null 2>&1
done
for m in "$out"/*/manifest.json; do
  $py - "$m" <<'PY'
import json, sys
m = json.load(open(sys.argv[1])); e = m["shapes_eval"]
print(f'{m["args"]["output_dir"].split("/")[-1]:14s} params {m["parameters"]/1e6:.2f}M  {m["wall_clock_s"]:.0f}s  overall {e["overall"]:.3f}  '
      f'fd {e["fd"]:.1f}  div {e["diversity"]:.2f}  ' + " ".join(f'{k[:6]} {v:.2f}' for k, v in e["per_family"].items()))
PY
done
