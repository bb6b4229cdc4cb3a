# shellcheck shell=sh
# Owns the helpers shared by the daemon VM scenarios
# (ci/vm/scenarios/daemon-*.sh except daemon-tree.sh, and bench-daemon.sh).
# Sourced, never run; POSIX sh.
#
# Guest helpers (dl_*) run under busybox ash inside the guest, where this
# file is /kite/daemon-lib.sh (installed by vm-images/build-initramfs); a
# scenario sources it from inside scenario_guest. Host helpers (dlh_*) run
# in a scenario's host side (bash -eu -o pipefail) from
# "$KITE_REPO/ci/vm/daemon-lib.sh"; they need kite_manifest (ci/vm/manifest.sh,
# which the runner sources first) and KITE_BIN.

# ---------------------------------------------------------------- guest ----

# dl_init NAME: names the scenario for messages; sets the daemon's paths.
dl_init() {
    DL_NAME=$1
    DL_SOCK=/run/kite/kite.sock
    DL_CACHE=/mnt/cache/kite
    DL_LOG=/tmp/daemon.log
    DL_DAEMON=
    mkdir -p /run/kite
    : >"$DL_LOG"
}

# dl_fail MESSAGE: report the failure with evidence (daemon log tail, status)
# on the console and end the scenario.
dl_fail() {
    echo "$*" >"$KITE_DETAIL"
    {
        echo "$DL_NAME: FAIL: $*"
        echo "----- daemon log (last 40 lines) -----"
        tail -n 40 "$DL_LOG"
        echo "----- kite status --json -----"
        kite status --json --socket "$DL_SOCK" 2>&1 | head -n 80
    } >&2
    exit 1
}

# dl_note MESSAGE: a progress line on the console.
dl_note() { echo "$DL_NAME: $*" >&2; }

# dl_now: seconds since boot (10 ms resolution).
dl_now() { cut -d' ' -f1 /proc/uptime; }

# dl_since START: seconds elapsed since START (from dl_now), one decimal.
dl_since() { awk -v a="$1" -v b="$(dl_now)" 'BEGIN { printf "%.2f", b - a }'; }

# dl_lt A B: true when number A < number B.
dl_lt() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a < b) }'; }

# dl_daemon_start [DAEMON ARGS...]: start `kite daemon` in the background on
# the cache disk (stderr appended to $DL_LOG), set DL_DAEMON to its PID and
# wait until its control socket answers.
dl_daemon_start() {
    kite daemon --cache-dir "$DL_CACHE" --socket "$DL_SOCK" "$@" 2>>"$DL_LOG" &
    DL_DAEMON=$!
    i=0
    until kite status --socket "$DL_SOCK" >/dev/null 2>&1; do
        kill -0 "$DL_DAEMON" 2>/dev/null || dl_fail "kite daemon exited at start"
        i=$((i + 1))
        [ "$i" -lt 150 ] || dl_fail "kite daemon did not answer on $DL_SOCK within 15 s"
        sleep 0.1
    done
}

# dl_daemon_stop [SIGNAL]: signal the daemon (default TERM) and wait for
# that PID only (a bare `wait` would also wait for servers the scenario
# started); fails the scenario if it still runs 10 s later.
dl_daemon_stop() {
    kill -"${1:-TERM}" "$DL_DAEMON" 2>/dev/null
    i=0
    # Gone, or a zombie waiting to be reaped: it has stopped.
    while [ -d "/proc/$DL_DAEMON" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$DL_DAEMON/status" 2>/dev/null; do
        i=$((i + 1))
        [ "$i" -lt 100 ] || dl_fail "kite daemon (pid $DL_DAEMON) still running 10 s after SIG${1:-TERM}"
        sleep 0.1
    done
    wait "$DL_DAEMON" 2>/dev/null
    DL_DAEMON=
}

# dl_status_flat: `kite status --json` as one record per line:
#   health - KEY VALUE
#   image FSID KEY VALUE          (scalar fields of an image)
#   blob FSID HEX KEY VALUE       (each field of each blob of each image)
# Strings lose their quotes, digests their "sha256:" prefix. The parser
# follows nesting by brackets, so it does not depend on the key order (the
# CLI's JSON has sorted keys: an image's "blobs" come before its "fsid").
dl_status_flat() {
    kite status --json --socket "$DL_SOCK" | awk '
        function strip(v) {
            sub(/,$/, "", v)
            if (v ~ /^"/) { v = substr(v, 2, length(v) - 2) }
            sub(/^sha256:/, "", v)
            return v
        }
        {
            line = $0
            sub(/^[ \t]+/, "", line)
            sub(/[ \t]+$/, "", line)
        }
        # A closing bracket ends the innermost container.
        line ~ /^[]}]/ {
            kind = stack[depth]
            if (kind == "blob") {
                for (i = 1; i <= nb; i++) { pending[++np] = bhex " " bk[i] " " bv[i] }
                nb = 0
            } else if (kind == "image") {
                for (i = 1; i <= np; i++) { print "blob " fsid " " pending[i] }
                for (i = 1; i <= ni; i++) { print "image " fsid " " ik[i] " " iv[i] }
                np = 0; ni = 0; fsid = ""
            }
            depth--
            next
        }
        # "key": value, "key": {, "key": [
        line ~ /^"[^"]*": / {
            key = line
            sub(/^"/, "", key)
            sub(/".*$/, "", key)
            val = line
            sub(/^"[^"]*": /, "", val)
            if (val == "{" || val == "[") {
                depth++
                stack[depth] = key
                next
            }
            if (val == "[]," || val == "[]" || val == "{}," || val == "{}") { val = "-" }
            val = strip(val)
            where = stack[depth]
            if (where == "health") {
                print "health - " key " " val
            } else if (where == "blob") {
                nb++; bk[nb] = key; bv[nb] = val
                if (key == "digest") { bhex = val }
            } else if (where == "image") {
                ni++; ik[ni] = key; iv[ni] = val
                if (key == "fsid") { fsid = val }
            }
            next
        }
        # An anonymous object opens: an element of "images" or of "blobs".
        line == "{" {
            depth++
            parent = stack[depth - 1]
            if (depth == 1) { stack[depth] = "root" }
            else if (parent == "images") { stack[depth] = "image" }
            else if (parent == "blobs") { stack[depth] = "blob"; bhex = "" }
            else { stack[depth] = "other" }
            next
        }
    '
}

# dl_check_tree N: mount /mnt/iN against the host's /data/manifestN (tree,
# metadata and every file's content); fails the scenario with a diff.
dl_check_tree() {
    kite_manifest "/mnt/i$1" >"/tmp/manifest$1" || dl_fail "walking image $1 failed"
    if ! cmp -s "/data/manifest$1" "/tmp/manifest$1"; then
        diff "/data/manifest$1" "/tmp/manifest$1" | head -n 20 >&2
        dl_fail "image $1: tree or contents differ from the host manifest"
    fi
}

# dl_blob HEX FIELD [FSID]: a blob's status field (from the first image
# listing it, or from image FSID). Empty when not found.
dl_blob() {
    dl_status_flat | awk -v h="$1" -v k="$2" -v f="${3:-}" '
        $1 == "blob" && $3 == h && $4 == k && (f == "" || $2 == f) { print $5; exit }'
}

# dl_health FIELD: a daemon health field.
dl_health() {
    dl_status_flat | awk -v k="$1" '$1 == "health" && $3 == k { print $4; exit }'
}

# dl_fsid DIR: the fsid kite mount uses for a converted image directory.
dl_fsid() {
    s=$(sha256sum <"$1/bootstrap")
    echo "${s%% *}"
}

# dl_kill_tree PID: SIGKILL PID and its direct children (busybox httpd and
# nc -ll fork one per connection), by PID, never by name. The parent is
# stopped first, so it forks no new child while the children are listed.
dl_kill_tree() {
    kill -STOP "$1" 2>/dev/null
    # Field 4 of /proc/PID/stat is the parent PID (these comms have no spaces).
    kids=$(awk -v p="$1" '$4 == p { print $1 }' /proc/[0-9]*/stat 2>/dev/null)
    # shellcheck disable=SC2086 # one PID per word
    kill -KILL "$1" $kids 2>/dev/null
    wait "$1" 2>/dev/null
}

# dl_read FILE [cat|dd]: read FILE to the end; prints "RC SECONDS ERROR".
# cat is busybox cat (it tries sendfile(2) first and falls back to read(2)
# when that fails); dd reads with plain read(2) calls of 64 KiB.
dl_read() {
    t=$(dl_now)
    if [ "${2:-cat}" = dd ]; then
        err=$(dd if="$1" of=/dev/null bs=65536 2>&1 >/dev/null)
    else
        err=$(cat "$1" 2>&1 >/dev/null)
    fi
    rc=$?
    echo "$rc $(dl_since "$t") $err"
}

# ----------------------------------------------------------------- host ----

# dlh_reference_manifest IMAGE_DIR OUT: the manifest of a converted image as
# the host's own kernel shows it: the bootstrap mounted file-backed (the host
# has EROFS_FS_BACKED_BY_FILE) with each blob's uncompressed layout as a
# device, walked with kite_manifest, unmounted.
dlh_reference_manifest() {
    img=$1
    out=$2
    ref=$(mktemp -d "${TMPDIR:-/tmp}/kite-refmanifest.XXXXXX")
    opts=ro
    for hex in $("$KITE_BIN" inspect "$img/bootstrap" --blobs-only); do
        "$KITE_BIN" unpack --bootstrap "$img/bootstrap" "$img/blobs/sha256/$hex" -o "$ref/$hex.layout" >/dev/null
        opts="$opts,device=$ref/$hex.layout"
    done
    mkdir "$ref/mnt"
    # util-linux mount would loop-mount the regular file; mount(2) directly.
    python3 - "$img/bootstrap" "$ref/mnt" "$opts" <<'PY'
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
src, target, data = (a.encode() for a in sys.argv[1:4])
MS_RDONLY = 1
if libc.mount(src, target, b"erofs", MS_RDONLY, data) != 0:
    err = ctypes.get_errno()
    sys.exit(f"mount -t erofs {sys.argv[1]} on {sys.argv[2]}: {os.strerror(err)}")
PY
    rc=0
    kite_manifest "$ref/mnt" >"$out" || rc=$?
    umount "$ref/mnt"
    rm -rf "$ref"
    return "$rc"
}
