# shellcheck shell=sh disable=SC2034 # SCENARIO_* are read by ci/vm-test
# Owns scenario daemon-gc: cache collection on the cachefiles path. Two
# images sharing a base layer (so one blob and one kernel cache file in
# common) are mounted and read whole. Image 1 is unmounted and forgotten
# (`kite umount`), then `kite gc` runs (again while the kernel still
# withdraws the unmounted objects and refuses them as busy): the kernel's
# cache files of image 1's own blob and bootstrap are culled, those of the
# shared blob and of image 2 stay; image 2 still reads every byte right
# after the page cache is dropped (served from the kernel's cache, no new
# fetch of the shared blob), and image 1 mounts again and reads every byte
# right (fetched again). A cache file is never culled while mounted:
# `kite gc` with both images mounted culls nothing. Then, under
# `--cache-size 1M`, the image that is registered but not mounted is
# evicted and its cache files culled; the mounted one stays and reads right.
SCENARIO_TIMEOUT=150

scenario_host() {
    data=$1
    . "$KITE_REPO/ci/vm/daemon-lib.sh"
    work=$(mktemp -d "${TMPDIR:-/tmp}/kite-daemon-gc.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    python3 - "$work" "$KITE_REPO/tests/tools" <<'PY'
import os, sys
work, tools = sys.argv[1:3]
sys.path.insert(0, tools)
from ocigen import Layer, Layout, blob, MiB

def base():
    l = Layer("gzip")
    for d in ("", "etc", "usr", "usr/lib"):
        l.dir(d)
    l.file("etc/os-release", b"ID=kite-gc\n")
    l.file("usr/lib/libbase.so.1", blob("binary", 2 * MiB + 777, 41), mode=0o755)
    return l

def app(n):
    l = Layer("zstd")
    l.dir("opt")
    l.file(f"opt/app{n}.bin", blob("random", 1 * MiB + 100 * n, 50 + n), mode=0o755)
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
    comm -23 "$work/blobs1" "$work/blobs2" >"$data/own1"
    comm -13 "$work/blobs1" "$work/blobs2" >"$data/own2"
    for f in shared own1 own2; do
        [ "$(wc -l <"$data/$f")" = 1 ] || { echo "expected one $f blob" >&2; exit 1; }
    done
}

scenario_guest() {
    . /kite/daemon-lib.sh
    dl_init daemon-gc
    shared=$(cat /data/shared)
    own1=$(cat /data/own1)
    own2=$(cat /data/own2)
    fsid1=$(dl_fsid /data/img1)
    fsid2=$(dl_fsid /data/img2)
    # present KEY: whether the kernel's cache file of KEY exists.
    present() { [ -n "$(find "$DL_CACHE/cache" -type f -name "D$1" 2>/dev/null)" ]; }
    dl_daemon_start --gc-grace 0
    mkdir -p /mnt/i1 /mnt/i2
    kite mount /data/img1 /mnt/i1 >&2 || dl_fail "mounting image 1 failed"
    kite mount /data/img2 /mnt/i2 >&2 || dl_fail "mounting image 2 failed"
    dl_check_tree 1
    dl_check_tree 2

    # Both mounted: nothing is culled (their objects are in use).
    out=$(kite gc --socket "$DL_SOCK") || dl_fail "kite gc failed"
    echo "$out" >&2
    case "$out" in
        *" 0 kernel cache files"*) ;;
        *) dl_fail "kite gc culled kernel cache files while both images were mounted: $out" ;;
    esac

    kite umount /mnt/i1 >&2 || dl_fail "kite umount of image 1 failed"
    # The kernel withdraws the unmounted objects asynchronously (after the
    # daemon read their CLOSE); until then they are busy and stay.
    i=0
    while present "$own1" || present "$fsid1"; do
        kite gc --socket "$DL_SOCK" >/dev/null 2>&1 || dl_fail "kite gc failed"
        i=$((i + 1))
        [ "$i" -lt 50 ] || dl_fail "image 1's cache files were not culled within 10 s (own blob present: $(present "$own1" && echo yes || echo no), bootstrap present: $(present "$fsid1" && echo yes || echo no))"
        sleep 0.2
    done
    # What a mounted image's objects look like on disk (kernel-notes).
    named=
    present "$shared" && named="$named shared"
    present "$own2" && named="$named own2"

    # Image 2 reads from the kernel's cache: no new fetch of the shared blob.
    reqs=$(dl_blob "$shared" backend_requests "$fsid2")
    echo 3 >/proc/sys/vm/drop_caches
    dl_check_tree 2
    [ "$(dl_blob "$shared" backend_requests "$fsid2")" = "$reqs" ] || dl_fail "image 2 fetched the shared blob again after the collection"

    # Image 1 comes back: fetched again, every byte right.
    kite mount /data/img1 /mnt/i1 >&2 || dl_fail "mounting image 1 again failed"
    dl_check_tree 1
    kite umount /mnt/i1 >&2 || dl_fail "kite umount of image 1 failed"
    kite umount /mnt/i2 >&2 || dl_fail "kite umount of image 2 failed"
    dl_daemon_stop

    # The size bound: a daemon bounded far below the two images evicts the
    # one that is registered but not mounted (after it has been idle 5 s)
    # and culls its cache files; the mounted one stays and reads right.
    dl_daemon_start --gc-grace 0 --cache-size 1M
    kite mount /data/img1 /mnt/i1 >&2 || dl_fail "bound: mounting image 1 failed"
    dl_check_tree 1
    umount /mnt/i1 || dl_fail "bound: umount of image 1 failed"
    kite mount /data/img2 /mnt/i2 >&2 || dl_fail "bound: mounting image 2 failed"
    dl_check_tree 2
    i=0
    while present "$own1" || [ -n "$(dl_status_flat | awk -v f="$fsid1" '$1 == "image" && $2 == f')" ]; do
        i=$((i + 1))
        [ "$i" -lt 100 ] || dl_fail "bound: image 1 (unmounted) was not evicted and culled within 20 s"
        sleep 0.2
    done
    grep -q "evicted an unmounted image" "$DL_LOG" || dl_fail "bound: no eviction logged"
    echo 3 >/proc/sys/vm/drop_caches
    dl_check_tree 2
    kite umount /mnt/i2 >&2 || dl_fail "bound: kite umount of image 2 failed"
    dl_daemon_stop
    echo "bound 1M: the unmounted image evicted and culled, the mounted one kept and read right; nothing culled while mounted; image 1 forgotten: its own blob's and bootstrap's cache files culled after $i gc rounds; image 2 (sharing a blob) read again from the kernel's cache with no new fetch; image 1 remounted and read right; cache files named while mounted:${named:- none}" >"$KITE_DETAIL"
}
