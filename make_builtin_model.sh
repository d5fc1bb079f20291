#!/usr/bin/env bash
# Rebuild the shipped demo model (src/diffused_heads/builtin) and the example inputs (src/diffused_heads/examples)
# from nothing: synthetic data, training on the CPU (about 45 minutes on 2 cores), and the evaluation on held-out
# clips. Needs the package installed (pip install -e .)
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

# Weights and configurations, with links to the one copy of the code (the wheel stores the files themselves),
# so that the folder loads with DiffusionPipeline.from_pretrained(..., trust_remote_code=True) as well.
builtin="$package/builtin"
rm -rf "$builtin"
mkdir -p "$builtin"
cp runs/builtin/model_index.json "$builtin/"
ln -s ../../../pipeline_diffused_heads.py "$builtin/pipeline_diffused_heads.py"
for part in unet audio_encoder scheduler; do
  mkdir -p "$builtin/$part"
  cp runs/builtin/$part/*.json "$builtin/$part/"
  cp runs/builtin/$part/*.safetensors "$builtin/$part/" 2>/dev/null || true
done
ln -s ../../../../unet/unet_diffused_heads.py "$builtin/unet/unet_diffused_heads.py"
ln -s ../../../../audio_encoder/audio_encoder_diffused_heads.py "$builtin/audio_encoder/audio_encoder_diffused_heads.py"
diffused-heads evaluate --model "$builtin" --data data/eval --num-clips 12 --steps 10 --json runs/builtin-eval.json
