# shellcheck shell=sh disable=SC2034 # SCENARIO_* are read by ci/vm-test
# Owns scenario daemon-prefetch-all: `kite mount --prefetch all` on the
# cachefiles path. Nothing is read: the daemon fetches every chunk of the
# image in the background into the cache objects the kernel handed over
# at mount; then the whole tree reads right with no further backend
# request (served from the kernel's cache).
SCENARIO_TIMEOUT=120

scenario_host() {
    data=$1
    . "$KITE_REPO/ci/vm/daemon-lib.sh"
    python3 - "$data" <<'PY'
import os, random, sys
data = sys.argv[1]
rng = random.Random(77)
root = os.path.join(data, "src")
for i in range(12):
    p = os.path.join(root, f"d{i % 3}", f"f{i}.bin")
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(rng.randbytes(900_000 + 7000 * i))
PY
    "$KITE_BIN" convert --quiet --from "dir:$data/src" --to "$data/img" >/dev/null
    rm -rf "$data/src"
    dlh_reference_manifest "$data/img" "$data/manifest"
}

scenario_guest() {
    . /kite/daemon-lib.sh
    dl_init daemon-prefetch-all
    fsid=$(dl_fsid /data/img)
    blob=$(kite inspect /data/img/bootstrap --blobs-only)
    dl_daemon_start
    mkdir -p /mnt/img
    kite mount /data/img /mnt/img --prefetch all >&2 || dl_fail "kite mount --prefetch all failed"
    t=$(dl_now)
    i=0
    until [ "$(dl_blob "$blob" missing_chunks "$fsid")" = 0 ]; do
        i=$((i + 1))
        [ "$i" -lt 300 ] || dl_fail "the background prefetch did not complete the image within 60 s ($(dl_blob "$blob" missing_chunks "$fsid") chunks missing)"
        sleep 0.2
    done
    secs=$(dl_since "$t")
    reqs=$(dl_blob "$blob" backend_requests "$fsid")
    echo 3 >/proc/sys/vm/drop_caches
    kite_manifest /mnt/img >/tmp/manifest || dl_fail "walking the image failed"
    cmp -s /data/manifest /tmp/manifest || dl_fail "the prefetched image differs from the host's"
    [ "$(dl_blob "$blob" backend_requests "$fsid")" = "$reqs" ] || dl_fail "reading the prefetched image fetched again"
    kite umount /mnt/img >&2 || dl_fail "kite umount failed"
    dl_daemon_stop
    echo "nothing read: every chunk fetched in the background in ${secs} s ($reqs backend requests); the whole tree then read right with no further request" >"$KITE_DETAIL"
}
