# shellcheck shell=sh disable=SC2034 # SCENARIO_* are read by ci/vm-test
# Owns scenario daemon-corrupt: check (c) of the daemon issue. A blob with
# one corrupted chunk: readers of the file that needs it get EIO (every
# time: nothing bad is cached), the same file's other chunk and every other
# file read fine, the corrupt bytes never reach the cache disk, and
# `kite status --json` counts the refused chunk.
#
# Host side: a directory tree whose bad.bin starts with a marker string
# followed by random bytes (random data is stored raw, so the marker is in
# the blob verbatim), and good.bin likewise with another marker; converted
# with 1 MiB chunks; one byte of bad.bin's first chunk is flipped in the
# blob (700000 bytes after the marker). After umount and daemon stop (a new
# cache file is an unnamed tmpfile until cachefiles commits it) the guest
# searches every file on the cache disk for both markers: the bad one must
# be absent, the good one present (which proves the search sees data).
SCENARIO_TIMEOUT=60

scenario_host() {
    data=$1
    work=$(mktemp -d "${TMPDIR:-/tmp}/kite-daemon-corrupt.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    python3 - "$work/tree" "$data" "$KITE_REPO/tests/tools" <<'PY'
import hashlib, os, random, sys
tree, data, tools = sys.argv[1:4]
sys.path.insert(0, tools)
from ocigen import blob
MiB = 1 << 20
rng = random.Random(20261122)
bad_marker = b"kite-canary-BAD-" + rng.randbytes(8).hex().encode()
good_marker = b"kite-canary-GOOD-" + rng.randbytes(8).hex().encode()
files = {
    "bad.bin": bad_marker + rng.randbytes(MiB + MiB // 2 - len(bad_marker)),
    "good.bin": good_marker + rng.randbytes(300 * 1024 - len(good_marker)),
    "etc/notes.txt": blob("text", 200 * 1024, 5),
    "etc/small.conf": b"answer = 42\n",
    "lib/libx.so": blob("binary", 700 * 1024, 6),
}
for name, content in files.items():
    path = os.path.join(tree, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
with open(os.path.join(data, "marker.bad"), "wb") as f:
    f.write(bad_marker + b"\n")
with open(os.path.join(data, "marker.good"), "wb") as f:
    f.write(good_marker + b"\n")
# What the guest must read intact: every other file, and bad.bin's second
# chunk (bytes 1 MiB..end), which is not corrupted.
with open(os.path.join(data, "sums"), "w") as f:
    for name, content in sorted(files.items()):
        if name != "bad.bin":
            f.write(f"{hashlib.sha256(content).hexdigest()} {name}\n")
with open(os.path.join(data, "bad-tail.sum"), "w") as f:
    f.write(hashlib.sha256(files["bad.bin"][MiB:]).hexdigest() + "\n")
with open(os.path.join(os.path.dirname(tree), "bad-head"), "wb") as f:
    f.write(files["bad.bin"][:4096])
PY
    "$KITE_BIN" convert --quiet --from "dir:$work/tree" --to "$data/image" >/dev/null
    hex=$("$KITE_BIN" inspect "$data/image/bootstrap" --blobs-only)
    [ "$(printf '%s\n' "$hex" | wc -l)" = 1 ] || { echo "expected one blob, got: $hex" >&2; exit 1; }
    "$KITE_BIN" check --blobs "$data/image" "$data/image/bootstrap" >/dev/null ||
        { echo "kite check fails before the corruption" >&2; exit 1; }
    python3 - "$data/image/blobs/sha256/$hex" "$data/marker.bad" "$work/bad-head" <<'PY'
import sys
path, marker_file, head_file = sys.argv[1:4]
marker = open(marker_file, "rb").read().strip()
head = open(head_file, "rb").read()
data = bytearray(open(path, "rb").read())
at = data.find(marker)
if at < 0 or data.find(marker, at + 1) >= 0:
    sys.exit(f"the bad marker occurs {data.count(marker)} times in the blob, expected once")
if bytes(data[at:at + len(head)]) != head:
    sys.exit("bad.bin's first chunk is not stored raw in the blob")
data[at + 700000] ^= 0x5A
open(path, "wb").write(data)
print(f"flipped blob byte {at + 700000} (marker at {at})")
PY
    if "$KITE_BIN" check --blobs "$data/image" "$data/image/bootstrap" >"$work/check.out" 2>&1; then
        echo "kite check does not see the corruption" >&2
        exit 1
    fi
    echo "kite check after the corruption: $(tail -n 1 "$work/check.out")"
}

scenario_guest() {
    . /kite/daemon-lib.sh
    dl_init daemon-corrupt
    # files_with STRING: the files on the cache disk containing STRING.
    # busybox grep matches line by line with C strings, so a NUL byte
    # earlier on the "line" hides a match: turn NULs into newlines first.
    files_with() {
        find /mnt/cache -type f | while IFS= read -r f; do
            tr '\000' '\n' <"$f" | grep -qF "$1" && echo "$f"
        done
    }
    bad=$(cat /data/marker.bad)
    good=$(cat /data/marker.good)
    dl_daemon_start
    mkdir -p /mnt/img
    kite mount /data/image /mnt/img >&2 || dl_fail "kite mount failed"

    # The file whose first chunk is corrupt: EIO, and again on a second try
    # (a refused chunk is never cached, so it is fetched and refused again).
    for attempt in 1 2; do
        # shellcheck disable=SC2046 # "RC SECONDS ERROR..." split on purpose
        set -- $(dl_read /mnt/img/bad.bin)
        rc=$1
        shift 2
        [ "$rc" != 0 ] || dl_fail "reading bad.bin succeeded (attempt $attempt)"
        case "$*" in
            *"Input/output error"* | *"I/O error"*) ;;
            *) dl_fail "reading bad.bin failed without EIO (attempt $attempt): $*" ;;
        esac
    done
    # Its second chunk is intact and reads fine.
    got=$(dd if=/mnt/img/bad.bin bs=1048576 skip=1 2>/dev/null | sha256sum)
    [ "${got%% *}" = "$(cat /data/bad-tail.sum)" ] || dl_fail "bad.bin's intact second chunk reads wrong"
    # Every other file reads fine.
    n=0
    while read -r sum name; do
        got=$(sha256sum <"/mnt/img/$name") || dl_fail "reading $name failed"
        [ "${got%% *}" = "$sum" ] || dl_fail "$name has wrong content"
        n=$((n + 1))
    done </data/sums

    hex=$(kite inspect /data/image/bootstrap --blobs-only)
    corrupt=$(dl_blob "$hex" corrupt_chunks)
    [ "${corrupt:-0}" -ge 1 ] || dl_fail "status shows corrupt_chunks=${corrupt:-missing}, expected >= 1"
    failed=$(dl_health reads_failed)
    [ "${failed:-0}" -ge 1 ] || dl_fail "status shows reads_failed=${failed:-missing}, expected >= 1"
    grep -q 'refusing corrupt chunk' "$DL_LOG" || dl_fail "daemon log does not mention the refused chunk"

    # The corrupt chunk never reached the cache; fetched data did. cachefiles
    # keeps a new cache file as an unnamed tmpfile and links it into the
    # cache directory when the object is withdrawn, so look after umount
    # and after the daemon (and with it the cache) has gone.
    kite umount /mnt/img >&2 || dl_fail "kite umount failed"
    dl_daemon_stop
    sync
    files=$(find /mnt/cache -type f | wc -l)
    hits=$(files_with "$bad")
    [ -z "$hits" ] || dl_fail "corrupt bytes (bad marker) found on the cache disk in: $hits"
    hits=$(files_with "$good")
    [ -n "$hits" ] || dl_fail "good marker not found in any of the $files files on the cache disk: the check sees nothing"
    dl_note "good marker in: $hits"
    echo "bad.bin: EIO twice, its intact chunk and $n other files read fine; corrupt_chunks=$corrupt reads_failed=$failed; bad marker absent from the cache disk, good marker present" >"$KITE_DETAIL"
}
