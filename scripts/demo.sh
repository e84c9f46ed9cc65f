#!/usr/bin/env bash
# The default job, end to end on Fashion-MNIST in 9 to 22 minutes on 2 CPU cores (set-up included):
# set up (if needed), train stage 1, extract the codes, train the top and bottom priors and the
# classifier, then draw a 10 classes x 10 samples grid, print its path, and export the models as
# one shareable folder (RUN/export: Hub layout and model card; load_pretrained reads it).
# Override the lengths with environment variables, e.g. VQVAE_STEPS=12000 for a better stage 1,
# and AUGMENT="flip shift" to train the priors on mirrored and shifted copies too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
data=/usr/share/datasets/fashion-mnist
run="${RUN_DIR:-runs/demo-$(date +%Y%m%d-%H%M%S)}"
bin=.venv/bin/vqvae2
echo "== stage 1: hierarchical VQ-VAE -> $run"
$bin train-vqvae --config fashion-mnist-32 --data "$data" --out "$run" \
  --max-steps "${VQVAE_STEPS:-1500}"
$bin reconstruct "$run" --data "$data" --split test --out "$run/test-reconstructions.png"
echo "== stage 2: codes, priors, classifier"
# shellcheck disable=SC2086  # AUGMENT is a list of words
$bin extract-codes "$run" --data "$data" ${AUGMENT:+--augment $AUGMENT}
$bin train-prior "$run" --level top --max-steps "${TOP_PRIOR_STEPS:-600}"
$bin train-prior "$run" --level bottom --max-steps "${BOTTOM_PRIOR_STEPS:-240}"
$bin train-classifier --run "$run" --data "$data" --max-steps "${CLASSIFIER_STEPS:-600}"
echo "== sampling: 10 classes x 10 samples"
$bin sample "$run" --n 100 --class 0 1 2 3 4 5 6 7 8 9 --out "$run/samples.png"
echo "== export: the trained models as one shareable folder"
$bin export "$run" "$run/export"
echo "sample grid: $run/samples.png (one row per class)"
