#!/usr/bin/env bash
# Set up a fresh Debian machine (Python 3.11) for vqvae2: a virtual environment in .venv with
# torch 2.13.0 (CPU wheel) installed first, the package and its test tools, and the
# Fashion-MNIST files from Debian when they are missing. Safe to run again: it only fills gaps.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "setup: installing Debian's dataset-fashion-mnist" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.13.0" >&2
  .venv/bin/pip install -q torch==2.13.0
fi
if ! .venv/bin/python -c "import vqvae2, pytest, ruff, xdist" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.vqvae2-installed ]; then
  echo "setup: installing vqvae2 and its test tools" >&2
  .venv/bin/pip install -q -e ".[dev]"
  touch .venv/.vqvae2-installed
fi
