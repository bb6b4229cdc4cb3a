# shellcheck shell=sh disable=SC2034 # SCENARIO_* are read by ci/vm-test
# Owns scenario daemon-warm-restart: check (e) of the daemon issue. Mount
# through the daemon, read everything (tree and contents match the host's
# manifest), umount, stop the daemon; start a new daemon on the same cache
# directory, mount again and read everything again: zero backend requests
# (the kernel's cache files on the cache disk answer every read) and the
# same tree and contents. Done twice: after a clean stop (SIGTERM) and after
# a crash (SIGKILL).
#
# Host side: a small directory tree (compressible text, incompressible and
# mixed binary files over several 1 MiB chunks, an empty file, a symlink,
# nested directories) converted with kite; the reference manifest is the
# image mounted file-backed on the host.
SCENARIO_TIMEOUT=90

scenario_host() {
    data=$1
    . "$KITE_REPO/ci/vm/daemon-lib.sh"
    work=$(mktemp -d "${TMPDIR:-/tmp}/kite-daemon-warm.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    python3 - "$work/tree" "$KITE_REPO/tests/tools" <<'PY'
import os, sys
tree, tools = sys.argv[1:3]
sys.path.insert(0, tools)
from ocigen import blob
KiB, MiB = 1024, 1 << 20
files = {
    "usr/share/doc/manual.txt": blob("text", 2 * MiB + 12345, 1),
    "usr/lib/libwarm.so": blob("binary", 1 * MiB + 4096, 2),
    "opt/model.bin": blob("random", 1536 * KiB, 3),
    "etc/config": b"cache = warm\n",
    "etc/empty": b"",
}
for name, content in files.items():
    path = os.path.join(tree, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
os.makedirs(os.path.join(tree, "var/lib/deep/er"))
os.symlink("../usr/lib/libwarm.so", os.path.join(tree, "etc/lib-link"))
PY
    "$KITE_BIN" convert --quiet --from "dir:$work/tree" --to "$data/image" >/dev/null
    dlh_reference_manifest "$data/image" "$data/manifest"
}

scenario_guest() {
    . /kite/daemon-lib.sh
    dl_init daemon-warm-restart
    mkdir -p /mnt/img
    blobs=$(kite inspect /data/image/bootstrap --blobs-only)
    # requests: total backend requests over the image's blobs.
    requests() {
        dl_status_flat | awk '$1 == "blob" && $4 == "backend_requests" { n += $5 } END { print n + 0 }'
    }
    # read_all ROUND: mount, compare the whole tree with the host, leave it mounted.
    read_all() {
        kite mount /data/image /mnt/img >&2 || dl_fail "round $1: kite mount failed"
        kite_manifest /mnt/img >/tmp/manifest.guest || dl_fail "round $1: walking the tree failed"
        if ! cmp -s /data/manifest /tmp/manifest.guest; then
            diff /data/manifest /tmp/manifest.guest | head -n 20 >&2
            dl_fail "round $1: tree or contents differ from the host manifest"
        fi
        failed=$(dl_health reads_failed)
        [ "$failed" = 0 ] || dl_fail "round $1: $failed READs failed"
    }

    dl_daemon_start
    read_all 1
    cold=$(requests)
    [ "$cold" -gt 0 ] || dl_fail "round 1 (cold cache) made no backend requests: the count is not working"
    for hex in $blobs; do
        c=$(dl_blob "$hex" chunks)
        f=$(dl_blob "$hex" fetched_chunks)
        [ "$f" = "$c" ] || dl_fail "round 1: blob $hex has $f of $c chunks fetched after reading everything"
    done
    kite umount /mnt/img >&2 || dl_fail "round 1: kite umount failed"

    summary="cold: $cold backend requests"
    round=2
    for sig in TERM KILL; do
        dl_daemon_stop "$sig"
        dl_note "daemon stopped with SIG$sig; starting a new one on the same cache"
        dl_daemon_start
        images=$(dl_status_flat | grep -c '^image .* fsid ')
        [ "$images" = 0 ] || dl_fail "the new daemon already lists $images images"
        read_all "$round"
        warm=$(requests)
        reads=$(dl_health reads)
        [ "$warm" = 0 ] || dl_fail "round $round (after SIG$sig restart): $warm backend requests on a warm cache, expected 0"
        fetched=
        for hex in $blobs; do
            fetched="$fetched$(dl_blob "$hex" fetched_chunks)/$(dl_blob "$hex" chunks) "
        done
        summary="$summary; after SIG$sig restart: 0 backend requests, $reads READs, fetched chunks (from saved state) ${fetched% }"
        kite umount /mnt/img >&2 || dl_fail "round $round: kite umount failed"
        round=$((round + 1))
    done
    dl_daemon_stop
    echo "tree matches host in 3 rounds ($(wc -l </data/manifest) entries); $summary" >"$KITE_DETAIL"
}
