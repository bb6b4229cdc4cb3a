# temporary debug scenario (to be deleted)
SCENARIO_TIMEOUT=60
scenario_host() {
    data=$1
    mkdir -p /tmp/zz && rm -rf /tmp/zz/* && mkdir -p /tmp/zz/tree
    printf 'kite-canary-GOOD-zz\n' > /tmp/zz/tree/a.txt
    head -c 200000 /dev/urandom >> /tmp/zz/tree/a.txt
    printf 'kite-canary-BAD-zz\n' > /tmp/zz/tree/b.txt
    head -c 200000 /dev/urandom >> /tmp/zz/tree/b.txt
    "$KITE_BIN" convert --quiet --from dir:/tmp/zz/tree --to "$data/image" >/dev/null
    hex=$("$KITE_BIN" inspect "$data/image/bootstrap" --blobs-only)
    python3 -c '
import sys; p=sys.argv[1]; d=bytearray(open(p,"rb").read()); i=d.find(b"kite-canary-BAD-zz"); d[i+1000]^=1; open(p,"wb").write(d)' "$data/image/blobs/sha256/$hex"
}
scenario_guest() {
    . /kite/daemon-lib.sh
    dl_init zz
    dl_daemon_start
    mkdir -p /mnt/img
    kite mount /data/image /mnt/img
    head -c 30 /mnt/img/a.txt
    MODE=$(cat /proc/cmdline)
    cat /mnt/img/b.txt > /dev/null
    echo "== mounted"; find /mnt/cache -type f -exec ls -ld {} \; ; 
    kite umount /mnt/img
    echo "== umounted"; find /mnt/cache -type f -exec ls -ld {} \;
    dl_daemon_stop
    echo "== stopped"; find /mnt/cache -type f -exec ls -ld {} \;
    dmesg | tail -20
    exit 1
}
