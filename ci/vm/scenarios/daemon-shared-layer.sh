# shellcheck shell=sh disable=SC2034 # SCENARIO_* are read by ci/vm-test
# Owns scenario daemon-shared-layer: check (f) of the daemon issue. Two OCI
# images share a base layer (the same layer tar, so the same kite blob);
# each is converted on its own. Both are mounted (one domain, so the shared
# blob has one cache file); reading all of image 1 fetches every chunk of
# the shared blob; reading all of image 2 afterwards fetches only image 2's
# own blob: the shared blob's fetched chunks and backend requests do not
# grow. Both trees match the host's manifests. (The daemon keeps one state
# per blob, using the backend of the image that registered it first, so the
# shared blob's request counter is image 1's backend's, in both images'
# status entries.)
#
# Host side: ocigen's Layer/Layout API builds the two layouts (identical
# base layer specs give identical tar bytes); `kite inspect --blobs-only`
# must list exactly one common blob, whose digest goes to the guest.
SCENARIO_TIMEOUT=90

scenario_host() {
    data=$1
    . "$KITE_REPO/ci/vm/daemon-lib.sh"
    work=$(mktemp -d "${TMPDIR:-/tmp}/kite-daemon-shared.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    python3 - "$work" "$KITE_REPO/tests/tools" <<'PY'
import os, sys
work, tools = sys.argv[1:3]
sys.path.insert(0, tools)
from ocigen import Layer, Layout, blob, MiB

def base():
    l = Layer("gzip")
    for d in ("", "etc", "usr", "usr/lib", "usr/share"):
        l.dir(d)
    l.file("etc/os-release", b"ID=kite-shared\n")
    l.file("usr/lib/libbase.so.1", blob("binary", 2 * MiB + 777, 11), mode=0o755)
    l.file("usr/share/base.txt", blob("text", 1 * MiB + 4321, 12))
    l.file("usr/share/base.dat", blob("random", 512 * 1024, 13))
    return l

def app(n):
    l = Layer("zstd")
    l.dir("opt")
    l.dir(f"opt/app{n}")
    l.file(f"opt/app{n}/main.bin", blob("binary", 1 * MiB + 100 * n, 20 + n), mode=0o755)
    l.file(f"opt/app{n}/data.txt", blob("text", 300 * 1024, 30 + n))
    l.file(f"opt/app{n}/release", f"VARIANT=app{n}\n".encode())
    return l

for n in (1, 2):
    lay = Layout(os.path.join(work, f"oci{n}"))
    m = lay.add_image([base(), app(n)])
    lay.finish([(m, "latest")])
PY
    for n in 1 2; do
        "$KITE_BIN" convert --quiet --from "oci:$work/oci$n" --to "$data/img$n" >/dev/null
        "$KITE_BIN" inspect "$data/img$n/bootstrap" --blobs-only | sort >"$work/blobs$n"
        dlh_reference_manifest "$data/img$n" "$data/manifest$n"
    done
    comm -12 "$work/blobs1" "$work/blobs2" >"$data/shared"
    comm -13 "$work/blobs1" "$work/blobs2" >"$data/own2"
    if [ "$(wc -l <"$data/shared")" != 1 ] || [ "$(wc -l <"$data/own2")" != 1 ]; then
        echo "expected exactly one shared blob and one own blob of image 2; image 1: $(cat "$work/blobs1"); image 2: $(cat "$work/blobs2")" >&2
        exit 1
    fi
    echo "shared blob: $(cat "$data/shared"); image 2's own blob: $(cat "$data/own2")"
}

scenario_guest() {
    . /kite/daemon-lib.sh
    dl_init daemon-shared-layer
    shared=$(cat /data/shared)
    own2=$(cat /data/own2)
    fsid1=$(dl_fsid /data/img1)
    fsid2=$(dl_fsid /data/img2)
    # field FSID HEX KEY: a blob's status field as image FSID lists it.
    field() { dl_blob "$2" "$3" "$1"; }

    dl_daemon_start
    mkdir -p /mnt/i1 /mnt/i2
    kite mount /data/img1 /mnt/i1 >&2 || dl_fail "kite mount of image 1 failed"
    kite mount /data/img2 /mnt/i2 >&2 || dl_fail "kite mount of image 2 failed"
    [ -n "$(field "$fsid2" "$shared" chunks)" ] || dl_fail "status does not list the shared blob under image 2"

    dl_check_tree 1
    chunks=$(field "$fsid1" "$shared" chunks)
    f1=$(field "$fsid1" "$shared" fetched_chunks)
    r1=$(field "$fsid1" "$shared" backend_requests)
    b1=$(field "$fsid1" "$shared" backend_bytes)
    [ "$f1" = "$chunks" ] || dl_fail "after reading image 1 the shared blob has $f1 of $chunks chunks fetched"
    [ "$r1" -gt 0 ] || dl_fail "reading image 1 made no backend requests for the shared blob"
    own2_before=$(field "$fsid2" "$own2" fetched_chunks)
    [ "$own2_before" = 0 ] || dl_fail "image 2's own blob has $own2_before chunks fetched before image 2 was read"

    dl_check_tree 2
    f2=$(field "$fsid2" "$shared" fetched_chunks)
    r2=$(field "$fsid2" "$shared" backend_requests)
    b2=$(field "$fsid2" "$shared" backend_bytes)
    [ "$f2" = "$f1" ] || dl_fail "reading image 2 changed the shared blob's fetched chunks: $f1 -> $f2"
    { [ "$r2" = "$r1" ] && [ "$b2" = "$b1" ]; } ||
        dl_fail "reading image 2 made backend requests for the shared blob: requests $r1 -> $r2, bytes $b1 -> $b2"
    r1b=$(field "$fsid1" "$shared" backend_requests)
    [ "$r1b" = "$r1" ] || dl_fail "image 1's backend counted $r1 -> $r1b requests while image 2 was read"
    own_chunks=$(field "$fsid2" "$own2" chunks)
    own_fetched=$(field "$fsid2" "$own2" fetched_chunks)
    own_req=$(field "$fsid2" "$own2" backend_requests)
    [ "$own_fetched" = "$own_chunks" ] || dl_fail "image 2's own blob has $own_fetched of $own_chunks chunks fetched after reading image 2"
    [ "$own_req" -gt 0 ] || dl_fail "reading image 2 made no backend requests for its own blob"
    failed=$(dl_health reads_failed)
    [ "$failed" = 0 ] || dl_fail "$failed READs failed"

    kite umount /mnt/i1 >&2 || dl_fail "kite umount /mnt/i1 failed"
    kite umount /mnt/i2 >&2 || dl_fail "kite umount /mnt/i2 failed"
    dl_daemon_stop
    echo "both trees match the host; after image 1: shared blob $f1/$chunks chunks, image 1's backend (which serves the shared blob) $r1 requests, $b1 bytes; after image 2: shared blob unchanged ($f2 chunks, $r2 requests, $b2 bytes), image 2's own blob $own_fetched/$own_chunks chunks in $own_req requests" >"$KITE_DETAIL"
}
