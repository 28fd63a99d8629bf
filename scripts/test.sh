#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs every check: ruff, mypy, and the test suite
# (unit, kernel-in-namespaces, real etcd, the multi-node cluster). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo ">> ruff";  .venv/bin/ruff check src tests bench
echo ">> mypy";  .venv/bin/mypy
echo ">> pytest"
.venv/bin/pytest -p no:cacheprovider -q -ra "$@"
