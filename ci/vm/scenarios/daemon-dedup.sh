# shellcheck shell=sh disable=SC2034 # SCENARIO_* are read by ci/vm-test
# Owns scenario daemon-dedup: node-level chunk dedup on the cachefiles path.
# v1 is one layer of files; v2 is the same layer rebuilt with one file
# changed (a new blob, most chunks byte-identical). v1 is mounted, read
# whole and unmounted but kept registered (its kernel cache files get their
# names once no object uses them); v2 is then mounted and read whole: its
# unchanged chunks are copied from v1's cache file (verified) instead of
# fetched, so v2's backend serves little more than the changed file. Both
# trees match the host's manifests.
SCENARIO_TIMEOUT=120

scenario_host() {
    data=$1
    . "$KITE_REPO/ci/vm/daemon-lib.sh"
    python3 - "$data" <<'PY'
import os, random, sys
data = sys.argv[1]
rng = random.Random(2024)
files = {f"lib/part{i}.so": rng.randbytes(700_000 + 1000 * i) for i in range(6)}
files.update({f"pkg/mod{i}.py": rng.randbytes(2000 + 300 * i) for i in range(30)})
for v in (1, 2):
    root = os.path.join(data, f"src{v}")
    for name, content in files.items():
        if v == 2 and name == "lib/part3.so":
            content = rng.randbytes(len(content))
        p = os.path.join(root, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(content)
with open(os.path.join(data, "changed"), "w") as f:
    f.write(str(700_000 + 3000))
PY
    for v in 1 2; do
        "$KITE_BIN" convert --quiet --from "dir:$data/src$v" --to "$data/img$v" >/dev/null
        rm -rf "$data/src$v"
        dlh_reference_manifest "$data/img$v" "$data/manifest$v"
    done
}

scenario_guest() {
    . /kite/daemon-lib.sh
    dl_init daemon-dedup
    fsid1=$(dl_fsid /data/img1)
    fsid2=$(dl_fsid /data/img2)
    blob1=$(kite inspect /data/img1/bootstrap --blobs-only)
    blob2=$(kite inspect /data/img2/bootstrap --blobs-only)
    changed=$(cat /data/changed)
    dl_daemon_start --gc-grace 0
    mkdir -p /mnt/i1 /mnt/i2
    kite mount /data/img1 /mnt/i1 >&2 || dl_fail "mounting v1 failed"
    dl_check_tree 1
    # A plain unmount keeps v1 registered; its cache file gets its name
    # once the kernel has withdrawn the object.
    umount /mnt/i1 || dl_fail "umount of v1 failed"
    i=0
    until [ -n "$(find "$DL_CACHE/cache" -type f -name "D$blob1" 2>/dev/null)" ]; do
        i=$((i + 1))
        [ "$i" -lt 50 ] || dl_fail "v1's cache file got no name within 10 s of its unmount"
        sleep 0.2
    done
    kite mount /data/img2 /mnt/i2 >&2 || dl_fail "mounting v2 failed"
    dl_check_tree 2
    copied=$(dl_blob "$blob2" copied_bytes "$fsid2")
    fetched=$(dl_blob "$blob2" backend_bytes "$fsid2")
    stored=$(dl_blob "$blob2" compressed_size "$fsid2")
    [ "${copied:-0}" -gt 0 ] || dl_fail "v2 copied nothing from v1's cache file (fetched $fetched of $stored stored bytes)"
    # The changed file (incompressible) plus a little: well under half.
    [ "$fetched" -lt $((changed * 2)) ] || dl_fail "v2 fetched $fetched bytes; only one file of $changed bytes changed (copied $copied)"
    kite umount /mnt/i2 >&2 || dl_fail "kite umount of v2 failed"
    dl_daemon_stop
    echo "v2 read whole with v1 unmounted but registered: copied $copied bytes from v1's kernel cache file, fetched $fetched of $stored stored bytes (the changed file is $changed bytes); both trees match the host" >"$KITE_DETAIL"
}
