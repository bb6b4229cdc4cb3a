# shellcheck shell=sh disable=SC2034 # SCENARIO_* are read by ci/vm-test
# Owns scenario daemon-one-small-file: check (g) of the daemon issue. An
# image of about 1 GiB (one 1 GiB file plus a 4 KiB file `small`, one blob,
# 1 MiB chunks); the guest reads only `small`: its content is right, and the
# backend served exactly one request of at most that file's stored chunk
# size (4096 bytes: random data is stored raw), with one chunk fetched.
#
# Host side: the 1 GiB file is made of 1024 chunks, each one 16-byte line
# (naming the chunk) repeated, so every chunk differs (no dedup) yet
# compresses to a few dozen bytes: the blob, and so the data disk, stays
# small. The source tree is deleted after conversion.
SCENARIO_TIMEOUT=60

scenario_host() {
    data=$1
    work=$(mktemp -d "${TMPDIR:-/tmp}/kite-daemon-small.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    mkdir "$work/tree"
    python3 - "$work/tree" "$data" <<'PY'
import hashlib, os, random, sys
tree, data = sys.argv[1:3]
MiB = 1 << 20
with open(os.path.join(tree, "big"), "wb") as f:
    for i in range(1024):
        line = b"kite chunk %4d\n" % i
        assert len(line) == 16
        f.write(line * (MiB // 16))
small = random.Random(77).randbytes(4096)
with open(os.path.join(tree, "small"), "wb") as f:
    f.write(small)
with open(os.path.join(data, "small.sum"), "w") as f:
    f.write(hashlib.sha256(small).hexdigest() + "\n")
PY
    "$KITE_BIN" convert --quiet --from "dir:$work/tree" --to "$data/image" >/dev/null
    summary=$("$KITE_BIN" inspect "$data/image/bootstrap" --summary)
    echo "$summary"
    # 1025 chunks, of which only small's is stored raw (4096 bytes).
    echo "$summary" | grep -q 'chunks *1025 (1 raw)' ||
        { echo "expected one blob of 1025 chunks with exactly one raw chunk" >&2; exit 1; }
    echo 4096 >"$data/small.stored"
    du -sh "$data"
}

scenario_guest() {
    . /kite/daemon-lib.sh
    dl_init daemon-one-small-file
    hex=$(kite inspect /data/image/bootstrap --blobs-only)
    limit=$(cat /data/small.stored)
    dl_daemon_start
    mkdir -p /mnt/img
    kite mount /data/image /mnt/img >&2 || dl_fail "kite mount failed"
    size=$(stat -c %s /mnt/img/big)
    [ "$size" = 1073741824 ] || dl_fail "big has size $size, expected 1 GiB"
    got=$(sha256sum </mnt/img/small) || dl_fail "reading small failed"
    [ "${got%% *}" = "$(cat /data/small.sum)" ] || dl_fail "small has wrong content"

    req=$(dl_blob "$hex" backend_requests)
    bytes=$(dl_blob "$hex" backend_bytes)
    fetched=$(dl_blob "$hex" fetched_chunks)
    chunks=$(dl_blob "$hex" chunks)
    usize=$(dl_blob "$hex" uncompressed_size)
    csize=$(dl_blob "$hex" compressed_size)
    dl_note "blob: $chunks chunks, $usize bytes uncompressed, $csize stored; backend $req requests, $bytes bytes; $fetched chunks fetched"
    [ "$req" = 1 ] || dl_fail "reading small made $req backend requests ($bytes bytes), expected 1"
    [ "$bytes" -le "$limit" ] || dl_fail "reading small fetched $bytes bytes, more than its chunk's $limit stored bytes"
    [ "$fetched" = 1 ] || dl_fail "reading small fetched $fetched chunks, expected 1"

    kite umount /mnt/img >&2 || dl_fail "kite umount failed"
    dl_daemon_stop
    echo "read 4 KiB small of a $usize-byte blob ($chunks chunks, $csize stored): 1 backend request, $bytes bytes (limit $limit), 1 chunk fetched" >"$KITE_DETAIL"
}
