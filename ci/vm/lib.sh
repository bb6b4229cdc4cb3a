# shellcheck shell=bash
# Shared helpers for kite's QEMU test rig (vm-images/build-*, ci/vm-test):
# messages, Debian package installs, the cache directory, kernel version
# choice. Sourced, never run; callers set `set -euo pipefail` themselves.

# Messages go to stderr so that a script's stdout carries only its result.
vm_log() { printf '%s: %s\n' "${VM_PROG:-vm}" "$*" >&2; }
vm_die() { printf '%s: error: %s\n' "${VM_PROG:-vm}" "$*" >&2; exit 1; }

# Print a script's opening comment block (its usage text) and exit 2.
vm_usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$1" >&2
    exit 2
}

# Where built kernels live; shared by every checkout on the machine.
vm_cache_dir() { printf '%s\n' "${KITE_CACHE_DIR:-/var/cache/kite}"; }

# Install Debian packages that are not installed yet. Runs `apt-get update`
# at most once per process, and only when something is missing.
VM_APT_UPDATED=${VM_APT_UPDATED:-0}
vm_apt_ensure() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || vm_die "needs root to install: ${missing[*]}"
    vm_log "installing ${missing[*]}"
    if [ "$VM_APT_UPDATED" -eq 0 ]; then
        apt-get update -qq >&2 || vm_die "apt-get update failed"
        VM_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >&2 || vm_die "apt-get install ${missing[*]} failed"
}

# Kernel targets: the Debian package holding the source tarball, by version.
vm_kernel_source_pkg() {
    case "$1" in
        6.12) printf 'linux-source-6.12\n' ;;
        6.1) printf 'linux-source-6.1\n' ;;
        *) vm_die "unknown kernel version '$1' (supported: 6.12, 6.1)" ;;
    esac
}
