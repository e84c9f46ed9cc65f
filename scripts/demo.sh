#!/usr/bin/env bash
# The default job: set up (if needed), train stage 1 on Fashion-MNIST for about five minutes on
# this CPU, then write reconstructions of the test split. Extra arguments go to train-vqvae.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
run="runs/demo-$(date +%Y%m%d-%H%M%S)"
.venv/bin/vqvae2 train-vqvae --config fashion-mnist-32 --out "$run" --max-steps 2000 "$@"
.venv/bin/vqvae2 reconstruct "$run" --data /usr/share/datasets/fashion-mnist --split test \
  --out "$run/test-reconstructions.png"
echo "reconstructions: $run/test-reconstructions.png (rows: original, reconstruction, top level only)"
