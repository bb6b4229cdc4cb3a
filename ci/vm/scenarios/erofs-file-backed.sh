# shellcheck shell=sh disable=SC2034 # SCENARIO_* are read by ci/vm-test
# Scenario erofs-file-backed: an image made by `kite convert` on the host
# mounts in the guest and its tree matches a manifest computed on the host.
#
# Host side: generates a small tree (nested and empty dirs, a directory
# bigger than one 4 KiB block, files from 0 bytes to > 3 MiB, a file with two
# identical 1 MiB chunks, zeros, setuid and non-root owners, symlinks incl. a
# dangling one), runs `kite convert --from dir:TREE`, unpacks every blob that
# `kite inspect --blobs-only` lists into its uncompressed layout, and puts
# bootstrap, DIGEST.raw files, the blob order and the manifest on the data
# disk.
#
# Guest side: mounts the bootstrap with one device= per blob and compares the
# manifest (ci/vm/manifest.sh, run by busybox) with the host's. On kernels
# with CONFIG_EROFS_FS_BACKED_BY_FILE (6.12+) the regular files are mounted
# directly (mount(2) through kite-vm-mount: busybox mount would loop them);
# on every kernel the same image is also mounted through loop devices, the
# only way on 6.1.
SCENARIO_TIMEOUT=90

scenario_host() {
    data=$1
    if [ -z "${KITE_BIN:-}" ] || [ ! -x "$KITE_BIN" ]; then
        echo "erofs-file-backed needs the kite binary (cargo build --release -p kite, or ci/vm-test --kite PATH)" >&2
        return 1
    fi
    work=$(mktemp -d "${TMPDIR:-/tmp}/kite-erofs-tree.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    tree=$work/tree
    out=$work/out

    mkdir -p "$tree/etc" "$tree/bin" "$tree/data" "$tree/empty" \
        "$tree/deep/a/b/c/d" "$tree/many"
    printf 'kite-vm\n' >"$tree/etc/hostname"
    seq 1 2000 | sed 's/^/line /' >"$tree/etc/config.txt"
    head -c $((3 * 1048576 + 123)) /dev/urandom >"$tree/bin/tool"
    chmod 755 "$tree/bin/tool"
    head -c 1048576 /dev/urandom >"$work/chunk"
    cat "$work/chunk" "$work/chunk" >"$tree/data/repeat"
    head -c $((2 * 1048576)) /dev/zero >"$tree/data/zeros"
    head -c 4096 /dev/urandom >"$tree/data/page"
    : >"$tree/data/empty"
    printf 'suid\n' >"$tree/bin/suid"
    chmod 4755 "$tree/bin/suid"
    printf 'private\n' >"$tree/data/private"
    chmod 600 "$tree/data/private"
    chown 1000:1000 "$tree/data/private"
    printf 'deep\n' >"$tree/deep/a/b/c/d/file"
    printf 'spaced\n' >"$tree/with space.txt"
    i=0
    while [ "$i" -lt 200 ]; do
        printf '%s\n' "$i" >"$tree/many/entry-$(printf '%03d' "$i")"
        i=$((i + 1))
    done
    ln -s etc/hostname "$tree/link-rel"
    ln -s tool "$tree/bin/sh"
    ln -s /nonexistent/target "$tree/dangling"
    chmod 755 "$tree"

    "$KITE_BIN" convert --from "dir:$tree" --to "$out"
    [ -f "$out/bootstrap" ] || { echo "kite convert wrote no $out/bootstrap" >&2; return 1; }
    "$KITE_BIN" inspect "$out/bootstrap" --blobs-only >"$data/blobs"
    cp "$out/bootstrap" "$data/bootstrap"
    while IFS= read -r hex; do
        case "$hex" in
            *[!0-9a-f]*|'') echo "kite inspect printed '$hex', not a sha256 hex digest" >&2; return 1 ;;
        esac
        "$KITE_BIN" unpack --bootstrap "$out/bootstrap" "$out/blobs/sha256/$hex" -o "$data/$hex.raw"
    done <"$data/blobs"
    kite_manifest "$tree" >"$data/manifest"
    echo "host: $(wc -l <"$data/manifest") entries, $(wc -l <"$data/blobs") blob(s), bootstrap $(wc -c <"$data/bootstrap") bytes"
}

scenario_guest() {
    fail() {
        echo "$*" >"$KITE_DETAIL"
        echo "erofs-file-backed: FAIL: $*" >&2
        exit 1
    }
    for f in bootstrap manifest blobs; do
        [ -f "/data/$f" ] || fail "the data disk has no $f (host side incomplete)"
    done
    mkdir -p /mnt/img

    # check MODE: compare the mounted tree with the host's manifest, unmount.
    check() {
        kite_manifest /mnt/img >/tmp/manifest.guest || fail "$1: walking the mounted tree failed"
        if ! cmp -s /data/manifest /tmp/manifest.guest; then
            diff /data/manifest /tmp/manifest.guest | head -n 30 >&2
            fail "$1: tree differs from the host manifest ($(diff /data/manifest /tmp/manifest.guest | grep -c '^[-+][^-+]') lines)"
        fi
        umount /mnt/img || fail "$1: umount failed"
    }

    # The guest's own kite (from the initramfs) reads the same device table.
    if command -v kite >/dev/null; then
        kite inspect /data/bootstrap --blobs-only >/tmp/blobs.guest ||
            fail "kite inspect failed in the guest"
        cmp -s /data/blobs /tmp/blobs.guest ||
            fail "kite inspect in the guest lists other blobs than on the host"
    fi

    modes=
    if zcat /proc/config.gz | grep -qx 'CONFIG_EROFS_FS_BACKED_BY_FILE=y'; then
        opts=
        while IFS= read -r hex; do
            opts=${opts:+$opts,}device=/data/$hex.raw
        done </data/blobs
        kite-vm-mount -r -t erofs ${opts:+-o "$opts"} /data/bootstrap /mnt/img ||
            fail "file-backed mount of /data/bootstrap failed"
        grep -q '^/data/bootstrap /mnt/img erofs ' /proc/mounts ||
            fail "/mnt/img is not a file-backed erofs mount: $(grep /mnt/img /proc/mounts)"
        check file-backed
        modes=file-backed
    fi

    # Loop devices: the bootstrap and each blob file, read-only.
    boot_loop=$(losetup -f) || fail "no free loop device"
    losetup -r "$boot_loop" /data/bootstrap || fail "losetup $boot_loop /data/bootstrap failed"
    opts=
    loops=$boot_loop
    while IFS= read -r hex; do
        dev=$(losetup -f) || fail "no free loop device for blob $hex"
        losetup -r "$dev" "/data/$hex.raw" || fail "losetup $dev /data/$hex.raw failed"
        opts=${opts:+$opts,}device=$dev
        loops="$loops $dev"
    done </data/blobs
    mount -t erofs -o "ro${opts:+,$opts}" "$boot_loop" /mnt/img || fail "loop-device mount failed"
    check loop
    for dev in $loops; do
        losetup -d "$dev"
    done
    modes=${modes:+$modes+}loop

    echo "tree matches the host manifest ($(wc -l </data/manifest) entries, $(wc -l </data/blobs) blob(s)); mounted $modes" >"$KITE_DETAIL"
}
