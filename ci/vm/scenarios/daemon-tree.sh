# shellcheck shell=sh disable=SC2034 # SCENARIO_* are read by ci/vm-test
# Scenario daemon-tree: the daemon serves a converted multi-layer image
# through cachefiles on-demand; `kite mount` (fsid + domain_id) shows the
# whole tree with every file's content as on the host (checks (a) of the
# daemon issue), and 32 parallel readers of random ranges get byte-exact
# data (check (b)).
#
# Host side: builds the example OCI image (tests/tools/ocigen.py example),
# converts it, mounts it file-backed on the host to compute the reference
# manifest, and picks 32 random (file, offset, length) ranges with their
# sha256.
SCENARIO_TIMEOUT=60

scenario_host() {
    data=$1
    work=$(mktemp -d "${TMPDIR:-/tmp}/kite-daemon-tree.XXXXXX")
    trap 'umount "$work/mnt" 2>/dev/null || true; rm -rf "$work"' EXIT
    python3 "$KITE_REPO/tests/tools/ocigen.py" example "$work/img" >/dev/null
    "$KITE_BIN" convert --quiet --from "oci:$work/img" --to "$data/image" >/dev/null
    # Reference tree: the same image mounted file-backed on the host.
    opts=ro
    for hex in $("$KITE_BIN" inspect "$data/image/bootstrap" --blobs-only); do
        "$KITE_BIN" unpack --bootstrap "$data/image/bootstrap" "$data/image/blobs/sha256/$hex" -o "$work/$hex.raw" >/dev/null
        opts=$opts,device=$work/$hex.raw
    done
    mkdir -p "$work/mnt"
    python3 -c 'import ctypes,sys; l=ctypes.CDLL(None,use_errno=True); sys.exit(l.mount(sys.argv[1].encode(),sys.argv[2].encode(),b"erofs",1,sys.argv[3].encode()))' \
        "$data/image/bootstrap" "$work/mnt" "$opts"
    kite_manifest "$work/mnt" >"$data/manifest"
    # 32 random ranges over the regular files.
    (cd "$work/mnt" && find . -type f -size +0 | LC_ALL=C sort) >"$work/files"
    python3 - "$work/mnt" "$work/files" >"$data/ranges" <<'PY'
import hashlib, os, random, sys
root, listing = sys.argv[1], sys.argv[2]
files = [l.strip() for l in open(listing) if l.strip()]
rng = random.Random(1234)
for _ in range(32):
    f = rng.choice(files)
    size = os.path.getsize(os.path.join(root, f))
    off = rng.randrange(size)
    n = rng.randint(1, min(size - off, 300000))
    with open(os.path.join(root, f), "rb") as fh:
        fh.seek(off)
        print(f, off, n, hashlib.sha256(fh.read(n)).hexdigest())
PY
    umount "$work/mnt"
}

scenario_guest() {
    fail() {
        echo "$*" >"$KITE_DETAIL"
        echo "daemon-tree: FAIL: $*" >&2
        kite status 2>&1 | head -20 >&2
        exit 1
    }
    mkdir -p /mnt/img /run/kite
    kite daemon --cache-dir /mnt/cache/kite --socket /run/kite/kite.sock 2>/tmp/daemon.log &
    i=0
    until kite status >/dev/null 2>&1; do
        i=$((i + 1))
        [ "$i" -lt 100 ] || { cat /tmp/daemon.log >&2; fail "daemon did not start"; }
        sleep 0.1
    done
    kite mount /data/image /mnt/img || { cat /tmp/daemon.log >&2; fail "kite mount failed"; }
    grep -q ' /mnt/img erofs .*fsid=' /proc/mounts || fail "not an fscache erofs mount: $(grep /mnt/img /proc/mounts)"

    # (b) 32 parallel readers of random ranges, on a cold cache.
    n=0
    pids=
    while read -r f off len sum; do
        n=$((n + 1))
        (
            got=$(tail -c +$((off + 1)) "/mnt/img/$f" | head -c "$len" | sha256sum)
            [ "${got%% *}" = "$sum" ] || echo "$f $off $len" >>/tmp/bad-ranges
        ) &
        pids="$pids $!"
    done </data/ranges
    # Only the readers: a bare `wait` would also wait for the daemon.
    # shellcheck disable=SC2086
    wait $pids
    [ ! -s /tmp/bad-ranges ] && [ "$n" -eq 32 ] ||
        fail "parallel readers got wrong data for: $(head -3 /tmp/bad-ranges 2>/dev/null) (ran $n)"

    # (a) the whole tree and every file's content.
    kite_manifest /mnt/img >/tmp/manifest.guest || fail "walking the mounted tree failed"
    if ! cmp -s /data/manifest /tmp/manifest.guest; then
        diff /data/manifest /tmp/manifest.guest | head -n 20 >&2
        fail "tree differs from the host manifest"
    fi
    kite status >&2
    failed=$(kite status --json | grep -o '"reads_failed": [0-9]*' | grep -o '[0-9]*$')
    [ "$failed" = 0 ] || fail "$failed READs failed"
    kite umount /mnt/img || fail "kite umount failed"
    echo "tree and content match ($(wc -l </data/manifest) entries), 32 parallel range readers byte-exact" >"$KITE_DETAIL"
}
