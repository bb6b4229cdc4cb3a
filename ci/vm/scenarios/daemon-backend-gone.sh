# shellcheck shell=sh disable=SC2034 # SCENARIO_* are read by ci/vm-test
# Owns scenario daemon-backend-gone: check (d) of the daemon issue. With the
# daemon on `--fetch-timeout 5` and images served over HTTP from the guest's
# loopback, a backend that goes away makes reads fail with EIO quickly and
# never hang:
#   1. busybox httpd serves image A (checked to answer Range with 206); a
#      file is read through it; then, while a reader is in the middle of a
#      16 MiB file, httpd and its per-connection children are killed: that
#      reader ends (EIO, or intact data if it was all fetched) within 15 s;
#      reads of files not fetched yet get EIO within 15 s; the file read
#      before still reads from the cache.
#   2. a server that accepts connections and never answers (busybox
#      `nc -ll -e sleep`) serves image B: two concurrent readers, busybox
#      cat (sendfile, then read on failure) and dd (plain read), get EIO
#      after the fetch timeout (at least 4 s, proving they waited on the
#      silent server) and within 15 s.
# Each READ the kernel sends is a new fetch with its own timeout, and the
# kernel retries a failed range (readahead, then read_folio; cat's read
# fallback adds one more), so a reader's EIO can take a multiple of it.
# Afterwards the daemon still answers and has no READ in flight.
SCENARIO_TIMEOUT=90

scenario_host() {
    data=$1
    python3 - "$data" <<'PY'
import hashlib, os, random, sys
data = sys.argv[1]
rng = random.Random(4242)
KiB, MiB = 1024, 1 << 20
images = {
    "image-a": {"a0.bin": 256 * KiB, "a1.bin": 256 * KiB, "a2.bin": 300 * KiB, "big.bin": 16 * MiB},
    "image-b": {"b0.bin": 64 * KiB, "b1.bin": 80 * KiB},
}
for img, files in images.items():
    tree = os.path.join(data, "src", img)
    os.makedirs(tree)
    with open(os.path.join(data, img + ".sums"), "w") as sums:
        for name, size in files.items():
            content = rng.randbytes(size)
            with open(os.path.join(tree, name), "wb") as f:
                f.write(content)
            sums.write(f"{hashlib.sha256(content).hexdigest()} {name}\n")
PY
    for img in image-a image-b; do
        "$KITE_BIN" convert --quiet --from "dir:$data/src/$img" --to "$data/$img" >/dev/null
    done
    rm -rf "$data/src"
}

scenario_guest() {
    . /kite/daemon-lib.sh
    dl_init daemon-backend-gone
    # sum_of IMAGE FILE: the host's sha256 of FILE in IMAGE.
    sum_of() { awk -v f="$2" '$2 == f { print $1 }' "/data/$1.sums"; }
    # expect_eio WHAT "RC SECONDS ERROR": fail unless it is a quick EIO.
    expect_eio() {
        what=$1
        # shellcheck disable=SC2086 # split "RC SECONDS ERROR..." on purpose
        set -- $2
        rc=$1
        secs=$2
        shift 2
        [ "$rc" != 0 ] || dl_fail "$what: read succeeded, expected EIO"
        case "$*" in
            *"Input/output error"* | *"I/O error"*) ;;
            *) dl_fail "$what: failed without EIO: $*" ;;
        esac
        dl_lt "$secs" 15 || dl_fail "$what: EIO took ${secs}s (limit 15 s, fetch timeout 5 s)"
    }
    # wait_file FILE SECONDS: wait until FILE exists; false on timeout.
    wait_file() {
        t=$(dl_now)
        until [ -e "$1" ]; do
            dl_lt "$(dl_since "$t")" "$2" || return 1
            sleep 0.1
        done
    }
    # bg_read FILE OUT cat|dd: read FILE in the background; writes
    # "RC SECONDS ERROR" to OUT when done.
    bg_read() {
        (
            r=$(dl_read "$1" "$3")
            echo "$r" >"$2.tmp" && mv "$2.tmp" "$2"
        ) &
    }

    dl_daemon_start --fetch-timeout 5
    mkdir -p /mnt/a /mnt/b
    hexa=$(kite inspect /data/image-a/bootstrap --blobs-only)

    # --- 1. httpd serves image A, then goes away mid-read. ---
    httpd -f -p 127.0.0.1:8080 -h /data/image-a &
    httpd_pid=$!
    # busybox wget refuses a 206 answer, so ask with a raw request.
    blobpath=/blobs/sha256/$hexa
    i=0
    until printf 'GET %s HTTP/1.0\r\nRange: bytes=10-19\r\n\r\n' "$blobpath" |
        nc 127.0.0.1 8080 >/tmp/range.resp 2>/dev/null && [ -s /tmp/range.resp ]; do
        i=$((i + 1))
        [ "$i" -lt 50 ] || dl_fail "busybox httpd does not answer on 127.0.0.1:8080"
        sleep 0.1
    done
    head -n 1 /tmp/range.resp | grep -q '^HTTP/1\.[01] 206' ||
        dl_fail "busybox httpd did not answer a Range request with 206: $(head -n 1 /tmp/range.resp)"
    tail -c 10 /tmp/range.resp >/tmp/range.body
    dd if="/data/image-a$blobpath" bs=1 skip=10 count=10 2>/dev/null | cmp -s - /tmp/range.body ||
        dl_fail "busybox httpd's 206 answer does not end with bytes 10-19 of the blob"

    kite mount /data/image-a /mnt/a --backend-url http://127.0.0.1:8080 >&2 ||
        dl_fail "kite mount with --backend-url failed"
    got=$(sha256sum </mnt/a/a0.bin)
    [ "${got%% *}" = "$(sum_of image-a a0.bin)" ] || dl_fail "a0.bin read over HTTP has wrong content"
    before=$(dl_blob "$hexa" fetched_chunks)

    # A reader in the middle of big.bin when the backend disappears.
    (
        t=$(dl_now)
        if sha256sum </mnt/a/big.bin >/tmp/big.sum 2>/tmp/big.err; then rc=0; else rc=1; fi
        echo "$rc $(dl_since "$t") $(cat /tmp/big.err)" >/tmp/big.res.tmp
        mv /tmp/big.res.tmp /tmp/big.res
    ) &
    i=0
    while [ "$(dl_blob "$hexa" fetched_chunks)" = "$before" ] && [ ! -e /tmp/big.res ]; do
        i=$((i + 1))
        [ "$i" -lt 200 ] || dl_fail "big.bin reader fetched nothing in 20 s"
        sleep 0.05
    done
    dl_kill_tree "$httpd_pid"
    killed=$(dl_now)
    at_kill=$(dl_blob "$hexa" fetched_chunks)
    wait_file /tmp/big.res 15 || dl_fail "the big.bin reader hung: no result 15 s after the backend was killed"
    # shellcheck disable=SC2046 # split "RC SECONDS ERROR..." on purpose
    set -- $(cat /tmp/big.res)
    big_rc=$1
    big_after=$(dl_since "$killed")
    if [ "$big_rc" = 0 ]; then
        got=$(cat /tmp/big.sum)
        [ "${got%% *}" = "$(sum_of image-a big.bin)" ] || dl_fail "big.bin read completely but with wrong content"
        big_outcome="read whole (all fetched before the kill)"
    else
        expect_eio "big.bin reader cut off mid-way" "$(cat /tmp/big.res)"
        big_outcome="EIO ${big_after}s after the kill"
    fi
    dl_note "big.bin reader: $big_outcome; blob chunks fetched before/at kill: $before/$at_kill of $(dl_blob "$hexa" chunks)"

    r1=$(dl_read /mnt/a/a1.bin)
    expect_eio "a1.bin after the backend died" "$r1"
    r2=$(dl_read /mnt/a/a2.bin dd)
    expect_eio "a2.bin after the backend died" "$r2"
    got=$(sha256sum </mnt/a/a0.bin) || dl_fail "a0.bin (cached) no longer reads"
    [ "${got%% *}" = "$(sum_of image-a a0.bin)" ] || dl_fail "a0.bin (cached) has wrong content"

    # --- 2. A backend that accepts and never answers. ---
    nc -ll -p 8081 -e sleep 120 &
    nc_pid=$!
    sleep 0.3
    kite mount /data/image-b /mnt/b --backend-url http://127.0.0.1:8081 >&2 ||
        dl_fail "kite mount of image B failed"
    rm -f /tmp/b0.res /tmp/b1.res
    bg_read /mnt/b/b0.bin /tmp/b0.res cat
    bg_read /mnt/b/b1.bin /tmp/b1.res dd
    wait_file /tmp/b0.res 20 || dl_fail "b0.bin reader hung on the silent backend (no result in 20 s)"
    wait_file /tmp/b1.res 20 || dl_fail "b1.bin reader hung on the silent backend (no result in 20 s)"
    rb0=$(cat /tmp/b0.res)
    rb1=$(cat /tmp/b1.res)
    dl_note "silent backend: cat b0.bin -> $rb0; dd b1.bin -> $rb1"
    expect_eio "cat b0.bin on the silent backend" "$rb0"
    expect_eio "dd b1.bin on the silent backend" "$rb1"
    for r in "$rb0" "$rb1"; do
        # shellcheck disable=SC2086
        set -- $r
        dl_lt 4 "$2" || dl_fail "EIO after only $2 s on the silent backend: the reader did not wait for the fetch timeout (is nc accepting?)"
    done
    dl_kill_tree "$nc_pid"

    # The daemon is alive and has completed every READ.
    inflight=$(dl_health reads_inflight)
    [ "$inflight" = 0 ] || dl_fail "daemon reports $inflight READs still in flight"
    failed=$(dl_health reads_failed)
    kite umount /mnt/a >&2 || dl_fail "kite umount /mnt/a failed"
    kite umount /mnt/b >&2 || dl_fail "kite umount /mnt/b failed"
    dl_daemon_stop
    # shellcheck disable=SC2086
    set -- $r1
    s1=$2
    # shellcheck disable=SC2086
    set -- $r2
    s2=$2
    # shellcheck disable=SC2086
    set -- $rb0
    sb0=$2
    # shellcheck disable=SC2086
    set -- $rb1
    sb1=$2
    echo "httpd killed mid-read: big.bin $big_outcome, unfetched files EIO in ${s1}s (cat)/${s2}s (dd), cached file intact; silent backend: EIO in ${sb0}s (cat)/${sb1}s (dd) (timeout 5 s); $failed READs failed, 0 in flight" >"$KITE_DETAIL"
}
