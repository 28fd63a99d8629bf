#!/usr/bin/env bash
# Makes real Kubernetes v1.20.2 binaries available for the kube-mode tests and the labs:
# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet (one `make`, which shares
# the compile work), the pause container's static binary, and kubectl (Debian's package). Built from Debian bookworm's own
# "kubernetes" source package (it ships vendor/, so no network is needed beyond apt) with
# Debian's Go 1.19. The binaries are cached OUTSIDE the clone so a machine pays the build
# (about 12-15 minutes on 2 cores) once; when the cache has them this script is a no-op.
# Run as root (apt installs). Prints the cache directory on its last line.
set -euo pipefail

CACHE_DIR=${PYFLANNEL_KUBE_CACHE:-/var/cache/pyflannel/kubernetes-v1.20.2}
BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet)
have_all() {
  local b
  for b in "${BINS[@]}"; do
    [ -x "$CACHE_DIR/$b" ] && "$CACHE_DIR/$b" --version 2>/dev/null | grep -q 'v1.20.2' || return 1
  done
  [ -x "$CACHE_DIR/pause" ]
}
# kubectl v1.20.2 (matches the servers): Debian's kubernetes-client, unpacked into the cache
# rather than installed, because another package may own /usr/bin/kubectl on the machine.
if ! { [ -x "$CACHE_DIR/kubectl" ] && "$CACHE_DIR/kubectl" version --client 2>/dev/null | grep -q v1.20.2; }; then
  KW=$(mktemp -d /var/tmp/pyflannel-kubectl.XXXXXX)
  chmod 0755 "$KW"  # apt downloads as the _apt user
  echo ">> fetching kubectl (kubernetes-client)"
  ( cd "$KW" && apt-get download -qq kubernetes-client && dpkg-deb -x kubernetes-client_*.deb x )
  mkdir -p "$CACHE_DIR"
  cp "$KW/x/usr/bin/kubectl" "$CACHE_DIR/kubectl.tmp.$$"
  chmod 0755 "$CACHE_DIR/kubectl.tmp.$$"
  mv -f "$CACHE_DIR/kubectl.tmp.$$" "$CACHE_DIR/kubectl"
  rm -rf "$KW"
fi

if have_all; then
  echo "$CACHE_DIR"
  exit 0
fi

WORK=$(mktemp -d /var/tmp/pyflannel-kas-build.XXXXXX)
chmod 0755 "$WORK"  # apt downloads as the _apt user
# The build tree is about 2 GB; only the binaries (about 350 MB) are kept.
trap 'rm -rf "$WORK"' EXIT

# 1) deb-src entries derived from the machine's own sources, in a private apt config, so
#    the system's apt state is left untouched (default sources carry only "Types: deb").
A=$WORK/apt
mkdir -p "$A/sources.d" "$A/lists/partial" "$A/cache/archives/partial"
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
  sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
    > "$A/sources.d/debian-src.sources"
fi
if [ -f /etc/apt/sources.list ]; then
  sed -n 's/^deb /deb-src /p' /etc/apt/sources.list > "$A/sources.d/debian-src.list"
fi
cat > "$A/apt.conf" <<CONF
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "$A/sources.d";
Dir::State::Lists "$A/lists";
Dir::Cache "$A/cache";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CONF
echo ">> fetching the kubernetes source package"
APT_CONFIG=$A/apt.conf apt-get update -qq
cd "$WORK"
APT_CONFIG=$A/apt.conf apt-get source --download-only -qq kubernetes

# 2) toolchain; rsync is needed by the k8s Makefile; reflect2 1.0.2 replaces the vendored
#    1.0.1, which crashes the server under Go >= 1.18 ("fatal error: key size wrong").
need=()
for p in golang-1.19-go rsync golang-github-modern-go-reflect2-dev gcc libc6-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
  echo ">> apt-get install ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# 3) unpack, fix reflect2, build
echo ">> unpacking"
mkdir src
tar xzf kubernetes_*.orig.tar.gz -C src
cd src/kubernetes-*/
V=vendor/github.com/modern-go/reflect2
R=/usr/share/gocode/src/github.com/modern-go/reflect2
rm -f "$V"/*.go "$V"/*.s
cp "$R"/*.go "$R"/*.s "$V"/
rm -f "$V"/*_test.go
echo ">> building ${BINS[*]} (about 12-15 minutes on 2 cores)"
PATH=/usr/lib/go-1.19/bin:$PATH CGO_ENABLED=0 make WHAT="${BINS[*]/#/cmd/}"
# The pause container: no registry is reachable, so its binary is built from the same tree.
gcc -Os -static -o _output/bin/pause build/pause/linux/pause.c

mkdir -p "$CACHE_DIR"
# Copy then rename so a concurrent reader never sees a half-written binary.
for b in "${BINS[@]}" pause; do
  cp "_output/bin/$b" "$CACHE_DIR/$b.tmp.$$"
  chmod 0755 "$CACHE_DIR/$b.tmp.$$"
  mv -f "$CACHE_DIR/$b.tmp.$$" "$CACHE_DIR/$b"
done
"$CACHE_DIR/kube-apiserver" --version
echo "$CACHE_DIR"
