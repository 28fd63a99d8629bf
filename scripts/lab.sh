#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the lab: a flannel cluster in network namespaces on
# this machine with a real etcd, shown and then removed. Arguments go to `pyflannel lab demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pyflannel lab demo "$@"
