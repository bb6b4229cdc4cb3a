#!/usr/bin/env python3
"""Manifest JSON of a real directory tree (for example a mounted EROFS image).

This file owns the walker side of kite's tree comparisons: it lstat()s every
path under ROOT without following symlinks, reads xattrs with
os.listxattr/os.getxattr (follow_symlinks=False), hashes regular files, and
prints the same manifest format as ``refapply.py`` (see its docstring), so
``manifestdiff.py`` can compare a mounted image with the reference applier.

    treemanifest.py ROOT [-o OUT.json]

Hard links: non-directories whose (st_dev, st_ino) is seen at several paths
get ``link_group``, the smallest of those paths in byte order. The walk does
not cross into other mounts below ROOT.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import sys

CHUNK = 4 << 20
_ZEROS = memoryview(bytes(CHUNK))
_BUF = bytearray(CHUNK)

TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
         stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
         stat.S_IFSOCK: "socket"}


def _sha256(path: str) -> str:
    """Content hash; holes (SEEK_HOLE) are hashed as zeros without reading
    them, so a sparse 4 GiB file neither takes long nor fills the page cache."""
    h = hashlib.sha256()
    zeros, buf = _ZEROS, _BUF
    with open(path, "rb", buffering=0) as f:
        fd, pos = f.fileno(), 0
        size = os.fstat(fd).st_size
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                data = size
            while pos < data:
                n = min(CHUNK, data - pos)
                h.update(zeros[:n])
                pos += n
            try:
                end = os.lseek(fd, pos, os.SEEK_HOLE) if pos < size else size
            except OSError:
                end = size
            os.lseek(fd, pos, os.SEEK_SET)
            while pos < end:
                n = f.readinto(memoryview(buf)[:min(CHUNK, end - pos)])
                if not n:
                    raise OSError(f"{path}: file shorter than its size")
                h.update(memoryview(buf)[:n])
                pos += n
    return h.hexdigest()


def _xattrs(path: str) -> dict:
    out = {}
    for name in sorted(os.listxattr(path, follow_symlinks=False)):
        out[name] = os.getxattr(path, name, follow_symlinks=False).hex()
    return out


def tree_manifest(root: str) -> dict:
    root = os.path.abspath(root)
    dev = os.lstat(root).st_dev
    found = []  # (manifest path, lstat)
    stack = [("/", root)]
    while stack:
        mpath, real = stack.pop()
        st = os.lstat(real)
        found.append((mpath, real, st))
        if stat.S_ISDIR(st.st_mode) and st.st_dev == dev:
            with os.scandir(real) as it:
                for e in it:
                    stack.append((mpath.rstrip("/") + "/" + e.name, e.path))

    inodes = {}
    for mpath, _, st in found:
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(mpath)
    group = {}
    for paths in inodes.values():
        if len(paths) > 1:
            canon = min(paths, key=os.fsencode)
            for p in paths:
                group[p] = canon

    entries = {}
    for mpath, real, st in sorted(found, key=lambda t: os.fsencode(t[0])):
        kind = TYPES[stat.S_IFMT(st.st_mode)]
        e = {"type": kind, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
             "mtime": st.st_mtime_ns // 1_000_000_000, "xattrs": _xattrs(real)}
        if kind == "file":
            e["size"], e["sha256"] = st.st_size, _sha256(real)
        elif kind == "symlink":
            e["target"] = os.readlink(real)
        elif kind in ("char", "block"):
            e["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
        if mpath in group:
            e["link_group"] = group[mpath]
        entries[mpath] = e
    return {"entries": entries}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Manifest JSON of a directory tree.")
    ap.add_argument("root")
    ap.add_argument("-o", "--output", help="write the manifest here instead of stdout")
    a = ap.parse_args(argv)
    if not os.path.isdir(a.root):
        print(f"treemanifest: error: {a.root} is not a directory", file=sys.stderr)
        return 2
    text = json.dumps(tree_manifest(a.root), indent=1)
    if a.output:
        with open(a.output, "w") as f:
            f.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
