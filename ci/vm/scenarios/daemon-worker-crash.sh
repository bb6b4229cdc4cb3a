# shellcheck shell=sh disable=SC2034 # SCENARIO_* are read by ci/vm-test
# Owns scenario daemon-worker-crash: the cachefiles path under a daemon
# whose worker dies or is replaced while readers are in the middle of
# files never fetched (the crash-safe daemon issue, cachefiles side).
#   1. SIGKILL of the worker mid-read: every reader gets its file's exact
#      bytes or an error (never other bytes); the holder starts a new
#      worker, which writes `restore` and adopts the image, and then every
#      file of the set reads exactly through the same mount.
#   2. SIGHUP to the holder mid-read (graceful worker restart): every
#      reader gets its exact bytes, no error.
#   3. `kite daemon --takeover` mid-read (upgrade to a new holder): every
#      reader gets its exact bytes, no error; the old holder exits.
#   4. SIGTERM to the holder mid-read (a whole-daemon stop): the holder
#      exits, the keeper holds /dev/cachefiles, readers wait; a new daemon
#      takes over and every reader gets its exact bytes, no error.
# Each step reads its own set of files, so each starts on a cold cache.
SCENARIO_TIMEOUT=150

scenario_host() {
    data=$1
    python3 - "$data" <<'PY'
import hashlib, os, random, sys
data = sys.argv[1]
rng = random.Random(1313)
MiB = 1 << 20
tree = os.path.join(data, "src")
with open(os.path.join(data, "image.sums"), "w") as sums:
    for step in ("crash", "hup", "takeover", "stop"):
        os.makedirs(os.path.join(tree, step))
        for i in range(6):
            content = rng.randbytes(4 * MiB + 4096 * i + 77)
            name = f"{step}/f{i}.bin"
            with open(os.path.join(tree, name), "wb") as f:
                f.write(content)
            sums.write(f"{hashlib.sha256(content).hexdigest()} {name}\n")
PY
    "$KITE_BIN" convert --quiet --from "dir:$data/src" --to "$data/image" >/dev/null
    rm -rf "$data/src"
}

scenario_guest() {
    . /kite/daemon-lib.sh
    dl_init daemon-worker-crash
    mkdir -p /mnt/img /tmp/r
    # readers STEP: hash every file of STEP in parallel, in the background;
    # each result is the sha256 or ERR. `wait_readers` waits for them.
    readers() {
        rm -f /tmp/r/*
        READERS=
        for f in $(awk -v s="$1/" 'index($2, s) == 1 { print $2 }' /data/image.sums); do
            out=/tmp/r/$(echo "$f" | tr / _)
            (
                if s=$(sha256sum <"/mnt/img/$f" 2>/dev/null); then
                    echo "${s%% *} $f" >"$out"
                else
                    echo "ERR $f" >"$out"
                fi
            ) &
            READERS="$READERS $!"
        done
    }
    wait_readers() {
        # shellcheck disable=SC2086 # one PID per word
        wait $READERS
    }
    # verdict STEP ALLOW_ERR: fail on any wrong hash (and on any error
    # unless ALLOW_ERR=1); prints the number of errors.
    verdict() {
        errs=0
        for r in /tmp/r/*; do
            read -r got f <"$r"
            want=$(awk -v f="$f" '$2 == f { print $1 }' /data/image.sums)
            if [ "$got" = ERR ]; then
                errs=$((errs + 1))
            elif [ "$got" != "$want" ]; then
                dl_fail "$1: WRONG BYTES in $f (sha256 $got, want $want)"
            fi
        done
        [ "$2" = 1 ] || [ "$errs" = 0 ] || dl_fail "$1: $errs readers got an error"
        echo "$errs"
    }
    # wait_worker OLD: until a worker other than OLD answers; prints seconds.
    wait_worker() {
        t=$(dl_now)
        i=0
        while :; do
            pid=$(dl_health pid 2>/dev/null)
            [ -n "$pid" ] && [ "$pid" != "$1" ] && [ "$pid" != 0 ] && break
            i=$((i + 1))
            [ "$i" -lt 300 ] || dl_fail "no new worker 30 s after worker $1 went"
            sleep 0.1
        done
        dl_since "$t"
    }

    # running: readers of the current step that have not finished.
    running() {
        echo $((6 - $(ls /tmp/r | wc -l)))
    }

    dl_daemon_start
    kite mount /data/image /mnt/img >&2 || dl_fail "kite mount failed"
    [ "$(dl_health kernel_path)" = cachefiles ] || dl_fail "not on the cachefiles path"

    # 1. Worker crash.
    worker=$(dl_health pid)
    readers crash
    sleep 0.1
    at_kill=$(running)
    kill -KILL "$worker"
    back=$(wait_worker "$worker")
    wait_readers
    crash_errs=$(verdict "worker crash" 1)
    readers crash
    wait_readers
    verdict "re-read after the crash" 0 >/dev/null
    [ "$(dl_health adopted_images)" = 1 ] || dl_fail "the new worker did not adopt the image"
    grep -q "restore written" "$DL_LOG" || dl_fail "the new worker did not write restore"

    # 2. Graceful worker restart.
    worker=$(dl_health pid)
    readers hup
    sleep 0.1
    at_hup=$(running)
    kill -HUP "$(dl_health holder_pid)"
    hup=$(wait_worker "$worker")
    wait_readers
    verdict "SIGHUP restart" 0 >/dev/null

    # 3. Upgrade: a new holder takes over.
    worker=$(dl_health pid)
    old=$DL_DAEMON
    readers takeover
    sleep 0.1
    at_up=$(running)
    kite daemon --cache-dir "$DL_CACHE" --socket "$DL_SOCK" --takeover 2>>"$DL_LOG" &
    DL_DAEMON=$!
    up=$(wait_worker "$worker")
    wait_readers
    verdict "takeover" 0 >/dev/null
    wait "$old" || dl_fail "the old holder did not exit cleanly after the hand-over"
    [ "$(dl_health holder_pid)" = "$DL_DAEMON" ] || dl_fail "status names holder $(dl_health holder_pid), not the new one ($DL_DAEMON)"

    # 4. Whole-daemon stop, then a new daemon.
    readers stop
    sleep 0.1
    at_stop=$(running)
    dl_daemon_stop TERM
    grep -q "keeper holds the kernel interface" "$DL_LOG" || dl_fail "the stop left no keeper while the image was mounted"
    sleep 1
    done_now=$(ls /tmp/r | wc -l)
    dl_daemon_start
    wait_readers
    verdict "stop and start" 0 >/dev/null
    grep -q "taken over from" "$DL_LOG" || dl_fail "the new daemon did not take the interface over from the keeper"

    kite umount /mnt/img >&2 || dl_fail "kite umount failed"
    dl_daemon_stop
    echo "readers still reading at each fault (of 6): kill $at_kill, SIGHUP $at_hup, takeover $at_up, stop $at_stop. Worker SIGKILL mid-read: $crash_errs of 6 readers got an error, 0 wrong bytes, new worker in ${back} s (restore written, image adopted), all bytes right after; SIGHUP restart: 0 errors, new worker in ${hup} s; takeover: 0 errors, new holder serving in ${up} s; stop with readers: $done_now of 6 done while stopped, then 0 errors after a new daemon took over from the keeper" >"$KITE_DETAIL"
}
