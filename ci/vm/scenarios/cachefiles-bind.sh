# shellcheck shell=sh disable=SC2034 # SCENARIO_* are read by ci/vm-test
# Scenario cachefiles-bind: the guest kernel has a working cachefiles
# on-demand cache. Checks /dev/cachefiles exists, `dir` + `tag` +
# `bind ondemand` succeed on the ext4 cache disk, a second open of the device
# gets EBUSY, an EROFS fscache mount (fsid=) sends an OPEN request whose
# volume and cookie keys follow the documented format, an error `copen` fails
# that mount, and the cache can be bound again after the
# first daemon fd is closed. No host side: it needs only the cache disk.
SCENARIO_TIMEOUT=60

scenario_guest() {
    fail() {
        echo "$*" >"$KITE_DETAIL"
        echo "cachefiles-bind: FAIL: $*" >&2
        exit 1
    }
    cachedir=/mnt/cache/kite

    [ -c /dev/cachefiles ] || fail "no /dev/cachefiles (CONFIG_CACHEFILES missing?)"
    zcat /proc/config.gz | grep -qx 'CONFIG_CACHEFILES_ONDEMAND=y' ||
        fail "CONFIG_CACHEFILES_ONDEMAND is not set in the running kernel"
    grep -qw erofs /proc/filesystems || fail "erofs is not in /proc/filesystems"
    grep -q ' /mnt/cache ext4 ' /proc/mounts || fail "the cache disk is not mounted ext4 on /mnt/cache"
    mkdir -p "$cachedir" /mnt/smoke

    # Each echo is one write(2), i.e. one cachefiles command.
    exec 3<>/dev/cachefiles
    echo "dir $cachedir" >&3 || fail "'dir $cachedir' was rejected"
    echo "tag kite-vm" >&3 || fail "'tag kite-vm' was rejected"
    echo "bind ondemand" >&3 || fail "'bind ondemand' was rejected"
    if [ ! -d "$cachedir/cache" ] || [ ! -d "$cachedir/graveyard" ]; then
        fail "bind did not create cache/ and graveyard/ in $cachedir"
    fi
    if (exec 4<>/dev/cachefiles) 2>/dev/null; then
        fail "a second open of /dev/cachefiles succeeded (expected EBUSY)"
    fi

    # Nothing pending: read(2) returns 0.
    n=$(dd bs=1024 count=1 <&3 2>/dev/null | wc -c)
    [ "$n" -eq 0 ] || fail "read with nothing pending returned $n bytes"

    # An fscache-mode EROFS mount blocks until its bootstrap OPEN is answered.
    kite-vm-mount -r -t erofs -o fsid=kite-smoke none /mnt/smoke 2>/tmp/smoke.err &
    mount_pid=$!
    msg=/tmp/cachefiles.msg
    tries=0
    while :; do
        dd bs=1024 count=1 <&3 >"$msg" 2>/dev/null
        [ -s "$msg" ] && break
        tries=$((tries + 1))
        [ "$tries" -lt 200 ] || fail "no request from the fscache mount within 20s"
        usleep 100000
    done
    # Header {msg_id, opcode, len, object_id}, then OPEN's
    # {volume_key_size, cookie_key_size, fd, flags}, then the keys.
    # shellcheck disable=SC2046 # od prints the numbers as separate words
    set -- $(od -A n -t u4 -N 32 "$msg")
    msg_id=$1 opcode=$2 len=$3 vsize=$5 csize=$6
    [ "$opcode" -eq 0 ] || fail "first request has opcode $opcode, expected OPEN (0)"
    [ "$len" -eq "$(wc -c <"$msg")" ] || fail "header len $len does not match the $(wc -c <"$msg") bytes read"
    volume=$(dd if="$msg" bs=1 skip=32 count="$vsize" 2>/dev/null | tr -d '\000')
    cookie=$(dd if="$msg" bs=1 skip=$((32 + vsize)) count="$csize" 2>/dev/null | tr -d '\000')
    [ "$volume" = "erofs,kite-smoke" ] || fail "OPEN volume key is '$volume', expected 'erofs,kite-smoke'"
    [ "$cookie" = "kite-smoke" ] || fail "OPEN cookie key is '$cookie', expected 'kite-smoke'"

    # A negative size in errno range fails the OPEN, and so the mount (the
    # mount reports EIO, not the errno given: the superblock read fails).
    echo "copen $msg_id,-2" >&3 || fail "'copen $msg_id,-2' was rejected"
    if wait "$mount_pid"; then
        fail "the fscache mount succeeded although its OPEN was refused"
    fi
    mount_err=$(sed 's/.*: //' /tmp/smoke.err)

    # Closing the daemon fd unbinds the cache; a new daemon can bind again.
    exec 3>&-
    exec 3<>/dev/cachefiles
    echo "dir $cachedir" >&3 || fail "'dir' after re-open was rejected"
    echo "bind ondemand" >&3 || fail "second 'bind ondemand' was rejected"
    exec 3>&-

    echo "bind ondemand ok; OPEN msg_id=$msg_id volume=$volume cookie=$cookie; copen -2 failed the mount ($mount_err); re-bind ok" >"$KITE_DETAIL"
}
