#!/usr/bin/env bash
# Rebuild the shipped demo models (src/diffused_heads/builtin and builtin_fast) and the example inputs (examples)
# from nothing: synthetic data, training on the CPU (about 45 minutes on 2 cores), its 2-step student (about an
# hour), and the evaluation of both on held-out clips. Needs the package installed (pip install -e .)
# and, for the speech, espeak-ng (Debian: apt-get install espeak-ng); without it the clips get synthetic
# syllable-like sounds and the result differs.
set -euo pipefail
cd "$(dirname "$0")"
package=src/diffused_heads

diffused-heads make-dataset --examples --output "$package/examples"
diffused-heads make-dataset --output data/train --num-clips 600 --split train --size 64
diffused-heads make-dataset --output data/eval --num-clips 40 --split eval --size 64

diffused-heads train --data data/train --output-dir runs/builtin --checkpoint-dir runs/builtin-checkpoints \
  --preset builtin --train-audio-encoder --prediction-type v_prediction --max-steps 2500 --batch-size 12 --learning-rate 2e-4 --lr-warmup-steps 200 \
  --lip-loss-weight 0.5 --motion-dropout 0.25 --ema-decay 0.999 --checkpoint-every 250 --seed 0 \
  --inference-steps 10 --stabilize-every 1 --sampling-variance fixed_small

# A model folder into the package: weights and configurations, with links to the one copy of the code (the wheel
# stores the files themselves), so that the folder loads with DiffusionPipeline.from_pretrained(...,
# trust_remote_code=True) as well.
ship() {
  local run=$1 target=$2
  rm -rf "$target"
  mkdir -p "$target"
  cp "$run"/model_index.json "$target/"
  for extra in README.md distillation.json; do
    if [ -f "$run/$extra" ]; then cp "$run/$extra" "$target/"; fi
  done
  ln -s ../../../pipeline_diffused_heads.py "$target/pipeline_diffused_heads.py"
  for part in unet audio_encoder scheduler; do
    mkdir -p "$target/$part"
    cp "$run/$part"/*.json "$target/$part/"
    cp "$run/$part"/*.safetensors "$target/$part/" 2>/dev/null || true
  done
  ln -s ../../../../unet/unet_diffused_heads.py "$target/unet/unet_diffused_heads.py"
  ln -s ../../../../audio_encoder/audio_encoder_diffused_heads.py "$target/audio_encoder/audio_encoder_diffused_heads.py"
}

builtin="$package/builtin"
ship runs/builtin "$builtin"
diffused-heads evaluate --model "$builtin" --data data/eval --num-clips 12 --steps 10 --json runs/builtin-eval.json

# The 2-step student (builtin-fast, the default model): direct distillation of the model above on the first 200
# training clips, trained at timesteps 999 and 199 (distill's default): about an hour on 2 cores of a CPU with
# bfloat16 (on one without, drop --mixed-precision bf16: slower, and the weights differ slightly).
diffused-heads make-dataset --output data/distill --num-clips 200 --split train --size 64
diffused-heads distill --model "$builtin" --data data/distill --output-dir runs/builtin-fast \
  --checkpoint-dir runs/builtin-fast-checkpoints --method direct --target-context ground-truth --max-steps 2500 \
  --batch-size 8 --learning-rate 2e-4 --lr-warmup-steps 20 --ema-decay 0.99 --lip-loss-weight 0.5 \
  --checkpoint-every 250 --mixed-precision bf16 --seed 0
ship runs/builtin-fast "$package/builtin_fast"
diffused-heads evaluate --model builtin-fast --model builtin-ddpm --data data/eval --num-clips 20 --seed 0 \
  --json runs/builtin-fast-eval.json
