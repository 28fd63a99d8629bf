#!/usr/bin/env bash
# The pyflannel image: build, sign, verify (see README "The image").
#   scripts/image.sh build [--out DIR] [--sign-key FPR]   (root; ~1.5 min cold, ~20 s warm)
#   scripts/image.sh verify ARCHIVE --key PUBKEY.asc
#   scripts/image.sh sign ARCHIVE --key FPR | policy --key PUBKEY.asc | lock
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pyflannel_lab.image "$@"
