#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the lab: a flannel cluster in network namespaces on
# this machine with a real etcd, shown and then removed. Arguments go to `pyflannel lab demo`
# (e.g. --nodes 5, --backend vxlan, --store kube).
set -euo pipefail
cd "$(dirname "$0")/.."
# The Kubernetes binaries take ~12-15 minutes to build on a new machine: only when asked for.
case " $* " in
  *" kube "*|*"--store=kube"*) ;;
  *) export PYFLANNEL_SKIP_KUBE_APISERVER="${PYFLANNEL_SKIP_KUBE_APISERVER:-1}" ;;
esac
bash scripts/setup.sh
exec .venv/bin/pyflannel lab demo "$@"
