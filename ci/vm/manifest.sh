# shellcheck shell=sh
# Tree manifest shared by the host (GNU coreutils) and the guest (busybox):
# one line per entry below a root, sorted by path as raw bytes, so the two
# sides can be compared with cmp. Sourced, never run; POSIX sh.
#
# Line format (fields separated by one space; PATH is last and may hold
# spaces):
#   d MODE UID:GID - - PATH                    directory
#   f MODE UID:GID SIZE SHA256 PATH            regular file
#   l MODE UID:GID SIZE - PATH -> TARGET       symlink (SIZE = target length)
#   c|b MODE UID:GID MAJ:MIN - PATH            device node (hex numbers)
#   p MODE UID:GID - - PATH                    fifo
# Timestamps are left out: they depend on the converter's inode format, not
# on whether the tree is intact.

# kite_manifest ROOT: print the manifest of ROOT's contents (ROOT excluded).
kite_manifest() {
    (
        cd "$1" || exit 1
        find . -mindepth 1 | LC_ALL=C sort | while IFS= read -r p; do
            meta=$(stat -c '%a %u:%g' "$p") || exit 1
            if [ -L "$p" ]; then
                target=$(readlink "$p") || exit 1
                printf 'l %s %s - %s -> %s\n' "$meta" "${#target}" "$p" "$target"
            elif [ -d "$p" ]; then
                printf 'd %s - - %s\n' "$meta" "$p"
            elif [ -f "$p" ]; then
                size=$(stat -c '%s' "$p") || exit 1
                sum=$(sha256sum <"$p") || exit 1
                printf 'f %s %s %s %s\n' "$meta" "$size" "${sum%% *}" "$p"
            elif [ -c "$p" ] || [ -b "$p" ]; then
                kind=c
                [ -b "$p" ] && kind=b
                printf '%s %s %s - %s\n' "$kind" "$meta" "$(stat -c '%t:%T' "$p")" "$p"
            elif [ -p "$p" ]; then
                printf 'p %s - - %s\n' "$meta" "$p"
            else
                printf '? %s - - %s\n' "$meta" "$p"
            fi
        done
    )
}
