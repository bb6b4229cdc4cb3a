#!/usr/bin/env python3
"""Reference applier: the merged tree of an OCI image, as a manifest JSON.

This file owns an applier that is independent of kite's converter: it reads
an OCI image layout (``oci:PATH[:TAG]``, platform default linux/amd64) or a
plain directory (``dir:PATH``, archived by GNU tar and applied as one layer)
with Python's tarfile, applies the layers in order with OCI whiteout
semantics, and prints the manifest that ``treemanifest.py`` prints for a real
directory tree, so the two can be compared with ``manifestdiff.py``.

    refapply.py oci:PATH[:TAG] [--platform linux/amd64] [-o OUT.json]
    refapply.py dir:PATH [-o OUT.json]

Semantics (per layer, in order):
- Blob, manifest and config digests are verified, and so is each layer's
  diff_id (sha256 of the uncompressed tar; one per layer). The config's
  media type must be an OCI or Docker image config.
- Whiteouts ``.wh.NAME`` and opaque markers ``.wh..wh..opq`` apply to the
  lower layers only: they are collected over the whole layer, each resolved
  against the tree the lower layers left, and applied before the layer's
  other entries, so neither their order in the tar nor the entries' matters.
  A marker in a missing directory or a non-directory hides nothing; one
  whose directory path goes through a symlink is refused. Markers create
  nothing.
- A non-directory replacing a directory removes its subtree; a directory
  entry over a directory replaces its metadata (mode, owner, mtime, xattrs)
  and keeps its children; anything else replaces the old node (so a name
  that was hardlinked below gets a fresh inode).
- Hard links share the node of their target (which may come from a lower
  layer); the link entry's own header metadata is ignored.
- Parent directories missing from the tar are created as 0755 root:root
  with mtime 0 (``IMPLICIT_MTIME``); the root "/" gets its metadata from a
  "./" entry if a layer has one, else the same defaults.
- Rejected as bad input: ``..`` components, absolute names, a name
  component over 255 bytes, a path through a symlink, a hard link to a
  missing target or a directory, a non-directory as a parent.

Manifest format: ``{"entries": {"/path": {"type", "mode", "uid", "gid",
"mtime", "xattrs": {name: hex}, "size" and "sha256" (files), "target"
(symlinks), "rdev": [major, minor] (devices), "link_group" (non-directories
reachable by several paths: the smallest such path in byte order)}}}``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import subprocess
import sys
import tarfile

IMPLICIT_MTIME = 0
CHUNK = 4 << 20

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
CONFIG_TYPES = ("application/vnd.oci.image.config.v1+json",
                "application/vnd.docker.container.image.v1+json")
LAYER_COMPRESSION = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
}
REF_NAME = "org.opencontainers.image.ref.name"


class ApplyError(Exception):
    """Bad input; the message names the layer digest and tar entry when known."""


class Node:
    __slots__ = ("type", "mode", "uid", "gid", "mtime", "xattrs", "size", "sha256",
                 "target", "rdev", "children")

    def __init__(self, type_, mode=0o755, uid=0, gid=0, mtime=IMPLICIT_MTIME, xattrs=None):
        self.type, self.mode, self.uid, self.gid = type_, mode, uid, gid
        self.mtime, self.xattrs = mtime, xattrs or {}
        self.size = self.sha256 = self.target = self.rdev = None
        self.children = {} if type_ == "dir" else None


# --------------------------------------------------------------------------
# Tree operations
# --------------------------------------------------------------------------

def split_path(name: str) -> list[str]:
    """Tar member name -> path components under the root; rejects escapes."""
    if name.startswith("/"):
        raise ApplyError("absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    for p in parts:
        if p == "..":
            raise ApplyError("'..' path component")
        if len(p.encode("utf-8", "surrogateescape")) > 255:
            raise ApplyError("name component longer than 255 bytes")
    return parts


def walk(root: Node, parts: list[str], create: bool) -> Node | None:
    """The directory at ``parts``; creates implicit dirs when ``create``."""
    node = root
    for i, p in enumerate(parts):
        child = node.children.get(p)
        if child is None:
            if not create:
                return None
            child = node.children[p] = Node("dir")
        elif child.type == "symlink":
            raise ApplyError(f"path goes through symlink /{'/'.join(parts[:i + 1])}")
        elif child.type != "dir":
            if not create:
                return None
            raise ApplyError(f"parent /{'/'.join(parts[:i + 1])} is not a directory")
        node = child
    return node


def _meta(m: tarfile.TarInfo, type_: str) -> Node:
    xattrs = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape").hex()
              for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    return Node(type_, m.mode & 0o7777, m.uid, m.gid, math.floor(m.mtime), xattrs)


class _Reader:
    """Counting, hashing read() wrapper (for the layer's diff_id)."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def read(self, n=-1):
        b = self.f.read(n)
        self.sha.update(b)
        self.n += len(b)
        return b

    def drain(self):
        while self.read(CHUNK):
            pass


def apply_layer(root: Node, stream, label: str) -> None:
    """Apply one uncompressed tar stream to the tree rooted at ``root``."""
    markers, entries = [], []  # markers: (tar name, directory parts, NAME or None)
    name = None
    try:
        tf = tarfile.open(fileobj=stream, mode="r|")
        for m in tf:
            name = m.name
            parts = split_path(m.name)
            base = parts[-1] if parts else ""
            if base == ".wh..wh..opq":
                markers.append((m.name, parts[:-1], None))
                continue
            if base.startswith(".wh."):
                if base[4:] in ("", ".", ".."):
                    raise ApplyError(f"whiteout {base!r} names {base[4:]!r}, which is not an entry")
                markers.append((m.name, parts[:-1], base[4:]))
                continue
            sha = None
            if m.isreg():
                h, f, left = hashlib.sha256(), tf.extractfile(m), m.size
                while left > 0:
                    b = f.read(min(CHUNK, left))
                    if not b:
                        raise ApplyError("unexpected end of file data")
                    h.update(b)
                    left -= len(b)
                sha = h.hexdigest()
            entries.append((m, parts, sha))
        name = None
    except ApplyError as e:
        raise ApplyError(f"{label}: entry {name!r}: {e}") from None
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        where = f"entry {name!r}" if name is not None else "tar stream"
        raise ApplyError(f"{label}: {where}: {type(e).__name__}: {e}") from None

    hidden = []
    for mname, parts, victim in markers:
        try:
            d = walk(root, parts, create=False)
        except ApplyError as e:
            raise ApplyError(f"{label}: entry {mname!r}: {e}") from None
        if d is not None:
            hidden.append((d, victim))
    for d, victim in hidden:
        if victim is None:
            d.children.clear()
        else:
            d.children.pop(victim, None)
    for m, parts, sha in entries:
        try:
            _apply_entry(root, m, parts, sha)
        except ApplyError as e:
            raise ApplyError(f"{label}: entry {m.name!r}: {e}") from None


def _apply_entry(root: Node, m: tarfile.TarInfo, parts: list[str], sha: str | None) -> None:
    if not parts:
        if not m.isdir():
            raise ApplyError("the root must be a directory")
        new = _meta(m, "dir")
        root.mode, root.uid, root.gid, root.mtime, root.xattrs = \
            new.mode, new.uid, new.gid, new.mtime, new.xattrs
        return
    parent = walk(root, parts[:-1], create=True)
    name, old = parts[-1], parent.children.get(parts[-1])
    if m.isdir():
        node = _meta(m, "dir")
        if old is not None and old.type == "dir":
            node.children = old.children
    elif m.islnk():
        tparts = split_path(m.linkname)
        tdir = walk(root, tparts[:-1], create=False) if tparts else None
        node = tdir.children.get(tparts[-1]) if tdir is not None else None
        if node is None:
            raise ApplyError(f"hard link target {m.linkname!r} does not exist")
        if node.type == "dir":
            raise ApplyError(f"hard link target {m.linkname!r} is a directory")
    elif m.isreg():
        node = _meta(m, "file")
        node.size, node.sha256 = m.size, sha
    elif m.issym():
        node = _meta(m, "symlink")
        node.target = m.linkname
    elif m.ischr() or m.isblk():
        # Linux device numbers: a 12-bit major, a 20-bit minor.
        if m.devmajor >= 1 << 12 or m.devminor >= 1 << 20:
            raise ApplyError(f"device number {m.devmajor}:{m.devminor} is not a Linux device number")
        node = _meta(m, "char" if m.ischr() else "block")
        node.rdev = [m.devmajor, m.devminor]
    elif m.isfifo():
        node = _meta(m, "fifo")
    else:
        raise ApplyError(f"unsupported tar entry type {m.type!r}")
    parent.children[name] = node


def manifest(root: Node) -> dict:
    """The manifest JSON object of the tree, paths in byte order."""
    out, paths_of = [], {}

    def visit(node, path):
        out.append((os.fsencode(path), path, node))
        if node.type == "dir":
            for name, child in node.children.items():
                visit(child, path.rstrip("/") + "/" + name)
        else:
            paths_of.setdefault(id(node), []).append(path)

    visit(root, "/")
    group = {}
    for paths in paths_of.values():
        if len(paths) > 1:
            canon = min(paths, key=os.fsencode)
            for p in paths:
                group[p] = canon
    entries = {}
    for _, path, n in sorted(out, key=lambda t: t[0]):
        e = {"type": n.type, "mode": n.mode, "uid": n.uid, "gid": n.gid, "mtime": n.mtime,
             "xattrs": dict(sorted(n.xattrs.items()))}
        if n.type == "file":
            e["size"], e["sha256"] = n.size, n.sha256
        elif n.type == "symlink":
            e["target"] = n.target
        elif n.type in ("char", "block"):
            e["rdev"] = n.rdev
        if path in group:
            e["link_group"] = group[path]
        entries[path] = e
    return {"entries": entries}


# --------------------------------------------------------------------------
# OCI layouts
# --------------------------------------------------------------------------

def _sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(CHUNK):
            h.update(b)
    return "sha256:" + h.hexdigest()


class OciLayout:
    def __init__(self, root: str):
        self.root = root
        if not os.path.isfile(os.path.join(root, "oci-layout")):
            raise ApplyError(f"{root}: not an OCI image layout (no oci-layout file)")

    def path(self, digest: str) -> str:
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
            raise ApplyError(f"unsupported or malformed digest {digest!r}")
        return os.path.join(self.root, "blobs", "sha256", hexd)

    def verify(self, desc: dict) -> str:
        p = self.path(desc["digest"])
        if not os.path.isfile(p):
            raise ApplyError(f"blob {desc['digest']}: missing")
        got = _sha256_file(p)
        if got != desc["digest"]:
            raise ApplyError(f"blob {desc['digest']}: digest mismatch (content is {got})")
        if "size" in desc and os.path.getsize(p) != desc["size"]:
            raise ApplyError(f"blob {desc['digest']}: size {os.path.getsize(p)} != descriptor {desc['size']}")
        return p

    def json(self, desc: dict) -> dict:
        with open(self.verify(desc), "rb") as f:
            return json.load(f)


def _platform_ok(p: dict | None, want: list[str]) -> bool:
    if p is None:
        return True
    got = [p.get("os"), p.get("architecture")] + ([p["variant"]] if p.get("variant") else [])
    return got[:2] == want[:2] and (len(want) < 3 or got[2:3] == want[2:3])


def select_manifest(lay: OciLayout, tag: str | None, platform: str) -> tuple[dict, dict]:
    """(manifest, config) for ``tag`` (or the only/first ref) and platform."""
    with open(os.path.join(lay.root, "index.json"), "rb") as f:
        top = json.load(f)["manifests"]
    if tag is not None:
        top = [d for d in top if d.get("annotations", {}).get(REF_NAME) == tag]
        if not top:
            raise ApplyError(f"{lay.root}: no image tagged {tag!r} in index.json")
    want, seen = platform.split("/"), []

    def resolve(desc):
        if desc["mediaType"] in INDEX_TYPES:
            for d in lay.json(desc)["manifests"]:
                if d.get("platform"):
                    seen.append("/".join(filter(None, (d["platform"].get("os"), d["platform"].get("architecture"),
                                                       d["platform"].get("variant")))))
                if _platform_ok(d.get("platform"), want):
                    r = resolve(d)
                    if r:
                        return r
            return None
        if desc["mediaType"] not in MANIFEST_TYPES:
            raise ApplyError(f"{desc['digest']}: unsupported media type {desc['mediaType']}")
        m = lay.json(desc)
        if m["config"]["mediaType"] not in CONFIG_TYPES:
            raise ApplyError(f"config {m['config']['digest']}: unsupported media type"
                             f" {json.dumps(m['config']['mediaType'])}")
        cfg = lay.json(m["config"])
        if desc.get("platform") is None and not _platform_ok(
                {"os": cfg.get("os"), "architecture": cfg.get("architecture"),
                 "variant": cfg.get("variant")}, want):
            seen.append(f"{cfg.get('os')}/{cfg.get('architecture')}")
            return None
        return m, cfg

    for d in top:
        r = resolve(d)
        if r:
            return r
    raise ApplyError(f"{lay.root}: no manifest for platform {platform}"
                     f" (available: {', '.join(seen) or 'none'})")


def apply_oci(path: str, tag: str | None, platform: str) -> Node:
    lay = OciLayout(path)
    m, cfg = select_manifest(lay, tag, platform)
    diff_ids = cfg.get("rootfs", {}).get("diff_ids", [])
    if len(diff_ids) != len(m["layers"]):
        raise ApplyError(f"config {m['config']['digest']}: {len(diff_ids)} rootfs.diff_ids"
                         f" for {len(m['layers'])} layers")
    root = Node("dir")
    for desc, diff_id in zip(m["layers"], diff_ids):
        label = f"layer {desc['digest']}"
        comp = LAYER_COMPRESSION.get(desc["mediaType"])
        if comp is None:
            raise ApplyError(f"{label}: unsupported media type {desc['mediaType']}")
        try:
            blob = lay.verify(desc)
        except ApplyError as e:
            raise ApplyError(f"{label}: {e}") from None
        proc = None
        with open(blob, "rb") as f:
            if comp == "gzip":
                src = gzip.GzipFile(fileobj=f, mode="rb")
            elif comp == "zstd":
                proc = subprocess.Popen(["zstd", "-dc", "-q"], stdin=f, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)
                src = proc.stdout
            else:
                src = f
            r = _Reader(src)
            try:
                apply_layer(root, r, label)
                try:
                    r.drain()
                except (OSError, EOFError) as e:
                    raise ApplyError(f"{label}: after the tar end: {type(e).__name__}: {e}") from None
            except ApplyError as e:
                if proc is not None:
                    proc.kill()
                    err = proc.stderr.read().decode(errors="replace").strip()
                    proc.wait()
                    if proc.returncode and err:
                        raise ApplyError(f"{e} (zstd: {err})") from None
                raise
            if proc is not None:
                err = proc.stderr.read().decode(errors="replace").strip()
                if proc.wait() != 0:
                    raise ApplyError(f"{label}: zstd failed: {err}")
        actual = "sha256:" + r.sha.hexdigest()
        if actual != diff_id:
            raise ApplyError(f"{label}: diff_id mismatch: the config says {diff_id},"
                             f" the uncompressed layer is {actual}")
    return root


def apply_dir(path: str) -> Node:
    """A directory as a one-layer image: GNU tar archives it, we apply that."""
    if not os.path.isdir(path):
        raise ApplyError(f"{path}: not a directory")
    proc = subprocess.Popen(["tar", "--xattrs", "--xattrs-include=*", "--sparse", "--format=pax",
                             "--numeric-owner", "-C", path, "-cf", "-", "."], stdout=subprocess.PIPE)
    root = Node("dir")
    try:
        apply_layer(root, proc.stdout, f"dir:{path}")
    finally:
        proc.stdout.read()
        if proc.wait() != 0:
            raise ApplyError(f"tar failed on {path}")
    return root


def parse_ref(ref: str) -> tuple[str, str, str | None]:
    kind, sep, rest = ref.partition(":")
    if not sep or kind not in ("oci", "dir"):
        raise ApplyError(f"bad reference {ref!r}: expected oci:PATH[:TAG] or dir:PATH")
    if kind == "oci":
        head, sep, tag = rest.rpartition(":")
        if sep and tag and "/" not in tag:
            return kind, head, tag
    return kind, rest, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Reference OCI layer applier; prints a manifest JSON.")
    ap.add_argument("ref", help="oci:PATH[:TAG] or dir:PATH")
    ap.add_argument("--platform", default="linux/amd64")
    ap.add_argument("-o", "--output", help="write the manifest here instead of stdout")
    a = ap.parse_args(argv)
    try:
        kind, path, tag = parse_ref(a.ref)
        root = apply_oci(path, tag, a.platform) if kind == "oci" else apply_dir(path)
    except ApplyError as e:
        print(f"refapply: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(manifest(root), indent=1)
    if a.output:
        with open(a.output, "w") as f:
            f.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
