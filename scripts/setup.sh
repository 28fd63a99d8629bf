#!/usr/bin/env bash
# Installs what pyflannel needs on a Debian/Ubuntu machine (as root): system tools and
# servers from apt, and the Python package (editable, with test tools) in ./.venv.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(iproute2 iptables nftables etcd-server etcd-client containernetworking-plugins
              iperf3 openssl procps kmod python3-venv librsvg2-bin iputils-ping
              wireguard-go wireguard-tools tcpdump
              mmdebstrap skopeo gpg gpgconf containerd runc patchelf util-linux
              gcc libc6-dev libpython3.11-dev strace)
# mmdebstrap, skopeo, gpg, patchelf: the image (scripts/image.sh); gcc, libc6-dev and
# libpython3.11-dev: the CNI plugin's launcher in its runtime (strace: its test); containerd, runc: its
# `ctr run` test and the kubelet lab's nodes (pyflannel lab up --kubernetes). Where systemd starts Debian's containerd, it is left alone: the tests
# run their own (own sockets and state, a private /run/containerd). wireguard-go,
# wireguard-tools, tcpdump: the wireguard backend's userspace implementation and its lab
# (the kernel here has no wireguard module; captures on the lab's wires).
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo ">> apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Debian starts etcd-server as a service on the standard ports; we never use that one
# (ours run on free ports inside our own namespaces), so it is left as the system has it.

# Real Kubernetes binaries (apiserver, controller-manager, scheduler, kubelet, pause) for the
# kube-mode tests and the labs:
# built once per machine (about 12-15 minutes on 2 cores) into /var/cache/pyflannel, a
# no-op afterwards. PYFLANNEL_SKIP_KUBE_APISERVER=1 skips it (the kube tests then skip).
if [ "${PYFLANNEL_SKIP_KUBE_APISERVER:-0}" != 1 ]; then
  echo ">> kubernetes binaries"
  bash scripts/build-kubernetes.sh
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo ">> creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import pyflannel, pytest, hypothesis' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  echo ">> pip install -e .[test]"
  .venv/bin/pip install -q -U pip >/dev/null
  .venv/bin/pip install -q -e '.[test]'
  touch .venv/.installed
fi
