#!/usr/bin/env python3
"""Generate OCI image layouts for kite's tests and benchmarks.

This file owns the test-image generator: a small library that turns layer
specs written in Python (``Layer``) into OCI image layouts (``Layout``:
oci-layout, index.json, blobs/sha256/...), and a CLI with the images the
suite needs:

    ocigen.py full OUTDIR [--docker] [--no-sparse]   full-coverage test image
    ocigen.py example OUTDIR                         small README demo image
    ocigen.py big OUTDIR [--size-gb 2] [--compression mixed|gzip|zstd|none]
    ocigen.py pair OUT1 OUT2                         two images sharing a base layer
    ocigen.py bad KIND OUTDIR                        one bad layer, see BAD_KINDS
    ocigen.py stalled OUTDIR                         second layer a named pipe
    ocigen.py runnable OUTDIR [--payload-mb 64] [--cmd JSON] [--message TEXT]
                                                     a container image: static
                                                     busybox, payload, a message

Each command prints one JSON line describing what it built (``ref`` is the
``oci:PATH:TAG`` reference to convert). Output is deterministic: fixed mtimes
unless a spec sets them, seeded pseudo-random content, no user/group names.

Tars are written with Python's tarfile (PAX by default, GNU per entry when
asked); sparse files come from GNU ``tar --sparse --format=gnu`` and are
spliced into the stream. Layers are compressed by the ``gzip`` and ``zstd``
CLIs in a child process, so generation streams and uses a second core.
"""

from __future__ import annotations

import argparse
import array
import concurrent.futures
import hashlib
import io
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib

MTIME = 1_700_000_000  # default mtime of every entry (2023-11-14)
CREATED = "2023-11-14T22:13:20Z"

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
REF_NAME = "org.opencontainers.image.ref.name"

MiB = 1 << 20
GiB = 1 << 30


# --------------------------------------------------------------------------
# Deterministic content
# --------------------------------------------------------------------------

_SYLLABLES = ("ka ri to ne sa mu lo pe vi da xo qu en al or is ux th st ch "
              "ing ed er ly an be co de fi go hu ja ki ma no pa ra se ti wo").split()
_pools: dict = {}


def _text_pool(size: int = 4 * MiB) -> bytes:
    """A pool of word-like text (compresses roughly 3x with zstd)."""
    key = ("text", size)
    if key not in _pools:
        r = random.Random(7)
        words = ["".join(r.choices(_SYLLABLES, k=r.randint(1, 4))) for _ in range(3000)]
        cum, acc = [], 0.0
        for i in range(len(words)):
            acc += 1.0 / (i + 1)
            cum.append(acc)
        tokens = r.choices(words, cum_weights=cum, k=size // 4)
        text = "\n".join(" ".join(tokens[i:i + 12]) for i in range(0, len(tokens), 12))
        _pools[key] = text.encode()[:size]
    return _pools[key]


def _random_pool(size: int = 8 * MiB) -> bytes:
    """A pool of incompressible bytes, made once from a seeded generator."""
    key = ("random", size)
    if key not in _pools:
        _pools[key] = random.Random(11).randbytes(size)
    return _pools[key]


def _counter_pool() -> bytes:
    """Little-endian u32 counters: the structured runs of "binary" content."""
    if "counter" not in _pools:
        _pools["counter"] = array.array("I", range(MiB)).tobytes()
    return _pools["counter"]


def content(kind: str, size: int, seed: int, piece: int = MiB):
    """Yield ``size`` deterministic bytes of ``kind`` in pieces of <= ``piece``.

    kinds: ``text`` (word-like, ~3x compressible), ``random``
    (incompressible), ``binary`` (random runs mixed with zeros and counters,
    ~1.5-2x), ``zero``. Content is spliced from slices of shared pools at
    seeded offsets, so it is cheap to make and different for every seed.
    """
    r = random.Random(seed)
    left = size
    while left > 0:
        n = min(piece, left)
        if kind == "zero":
            yield bytes(n)
        else:
            yield _piece(kind, n, r)
        left -= n


def _piece(kind: str, n: int, r: random.Random) -> bytes:
    parts, got = [], 0
    if kind == "text":
        pool, lo, hi = _text_pool(), 2048, 16384
    elif kind == "random":
        pool, lo, hi = _random_pool(), 16384, 131072
    elif kind == "binary":
        pool, lo, hi = _random_pool(), 512, 4096
    else:
        raise ValueError(f"unknown content kind {kind!r}")
    while got < n:
        k = min(r.randint(lo, hi), n - got)
        if kind == "binary" and r.random() < 0.5:
            if r.random() < 0.5:
                part = bytes(k)
            else:
                off = r.randrange(MiB - k // 4 - 1) * 4
                part = _counter_pool()[off:off + k]
        else:
            off = r.randrange(len(pool) - k)
            part = pool[off:off + k]
        parts.append(part)
        got += k
    return b"".join(parts)


def blob(kind: str, size: int, seed: int) -> bytes:
    return b"".join(content(kind, size, seed))


class Stream:
    """File data made on demand: ``size`` bytes from ``factory()`` chunks."""

    def __init__(self, size: int, factory):
        self.size = size
        self.factory = factory

    @classmethod
    def of(cls, kind: str, size: int, seed: int) -> "Stream":
        return cls(size, lambda: content(kind, size, seed))


class _IterReader(io.RawIOBase):
    """A read()-able view of an iterator of bytes, for tarfile.addfile."""

    def __init__(self, it):
        self._it = iter(it)
        self._buf = b""

    def readable(self):
        return True

    def read(self, n=-1):
        while n < 0 or len(self._buf) < n:
            chunk = next(self._it, None)
            if chunk is None:
                break
            self._buf = self._buf + chunk if self._buf else chunk
        if n < 0:
            n = len(self._buf)
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


class _HashWriter:
    """Write-through that hashes and counts (the layer's diff_id and size)."""

    def __init__(self, out):
        self.out = out
        self.sha = hashlib.sha256()
        self.n = 0

    def write(self, b):
        self.sha.update(b)
        self.out.write(b)
        self.n += len(b)
        return len(b)

    def tell(self):
        return self.n

    def flush(self):
        pass


# --------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------

def _xattr_str(v) -> str:
    """PAX header values are str in tarfile; binary bytes ride as surrogates."""
    if isinstance(v, str):
        v = v.encode()
    return v.decode("utf-8", "surrogateescape")


class _TarInfo(tarfile.TarInfo):
    """TarInfo whose PAX records carry binary values raw, as Go's archive/tar
    writes them, instead of adding Python's ``hdrcharset=BINARY`` record."""

    @classmethod
    def _create_pax_generic_header(cls, pax_headers, type, encoding):
        records = b""
        for keyword, value in pax_headers.items():
            rec = b" " + keyword.encode() + b"=" + value.encode("utf-8", "surrogateescape") + b"\n"
            n = len(rec) + 1
            while len(str(n)) + len(rec) != n:
                n += 1
            records += str(n).encode() + rec
        info = {"name": "././@PaxHeader", "type": type, "size": len(records),
                "magic": tarfile.POSIX_MAGIC}
        return cls._create_header(info, tarfile.USTAR_FORMAT, "ascii", "replace") + \
            cls._create_payload(records)


class Layer:
    """An ordered list of tar entries plus how the layer blob is compressed.

    Paths are relative to the image root ("etc/passwd", "" or "." for the
    root); ``prefix`` (for example "./") is prepended to every name and hard
    link target in the tar. Metadata keywords on every adder: ``mode``,
    ``uid``, ``gid``, ``mtime`` (int, or float for a PAX fractional time),
    ``xattrs`` ({name: bytes|str}, stored as PAX ``SCHILY.xattr.`` records)
    and ``fmt`` (a tarfile format for just this entry, e.g. GNU_FORMAT).
    """

    def __init__(self, compression: str = "gzip", *, prefix: str = "", mtime: int = MTIME):
        if compression not in MT_OCI_LAYER:
            raise ValueError(f"unknown compression {compression!r}")
        self.compression = compression
        self.prefix = prefix
        self.mtime = mtime
        self.items: list = []

    def _name(self, path: str) -> str:
        path = path.strip("/")
        return self.prefix + path if path not in ("", ".") else "."

    def _info(self, path, type_, mode, uid=0, gid=0, mtime=None, xattrs=None, fmt=None):
        ti = _TarInfo(self._name(path))
        ti.type = type_
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.uname = ti.gname = ""
        ti.mtime = self.mtime if mtime is None else mtime
        if xattrs:
            ti.pax_headers = {"SCHILY.xattr." + k: _xattr_str(v) for k, v in xattrs.items()}
        return ti, fmt

    def add(self, ti: tarfile.TarInfo, data=None, fmt=None) -> "Layer":
        """Append a prepared TarInfo; ``data`` is bytes or a Stream."""
        if isinstance(data, (bytes, bytearray)):
            ti.size = len(data)
        elif isinstance(data, Stream):
            ti.size = data.size
        self.items.append(("entry", ti, data, fmt))
        return self

    def dir(self, path, mode=0o755, **meta):
        ti, fmt = self._info(path, tarfile.DIRTYPE, mode, **meta)
        return self.add(ti, None, fmt)

    def file(self, path, data=b"", mode=0o644, **meta):
        ti, fmt = self._info(path, tarfile.REGTYPE, mode, **meta)
        return self.add(ti, data, fmt)

    def symlink(self, path, target, mode=0o777, **meta):
        ti, fmt = self._info(path, tarfile.SYMTYPE, mode, **meta)
        ti.linkname = target
        return self.add(ti, None, fmt)

    def hardlink(self, path, target, mode=0o644, **meta):
        ti, fmt = self._info(path, tarfile.LNKTYPE, mode, **meta)
        ti.linkname = self._name(target)
        return self.add(ti, None, fmt)

    def _dev(self, type_, path, major, minor, mode, meta):
        ti, fmt = self._info(path, type_, mode, **meta)
        ti.devmajor, ti.devminor = major, minor
        return self.add(ti, None, fmt)

    def char(self, path, major, minor, mode=0o666, **meta):
        return self._dev(tarfile.CHRTYPE, path, major, minor, mode, meta)

    def block(self, path, major, minor, mode=0o660, **meta):
        return self._dev(tarfile.BLKTYPE, path, major, minor, mode, meta)

    def fifo(self, path, mode=0o644, **meta):
        ti, fmt = self._info(path, tarfile.FIFOTYPE, mode, **meta)
        return self.add(ti, None, fmt)

    def whiteout(self, path):
        """Delete ``path`` (and its subtree) from the layers below."""
        head, _, base = path.strip("/").rpartition("/")
        return self.file((head + "/" if head else "") + ".wh." + base, b"", mode=0o600)

    def opaque(self, dirpath):
        """Hide every lower-layer child of ``dirpath``."""
        return self.file(dirpath.strip("/") + "/.wh..wh..opq", b"", mode=0o600)

    def sparse(self, path, size, extents, mode=0o644, uid=0, gid=0, mtime=None):
        """A GNU sparse file: ``extents`` is [(offset, bytes)], the rest holes."""
        self.items.append(("sparse", path, size, extents, mode, uid, gid,
                           self.mtime if mtime is None else mtime))
        return self

    # -- writing -----------------------------------------------------------

    def write_tar(self, out) -> None:
        """Stream the tar to ``out`` (needs write(); tell() is added here)."""
        w = out if isinstance(out, _HashWriter) else _HashWriter(out)
        tf = tarfile.open(fileobj=w, mode="w", format=tarfile.PAX_FORMAT,
                          encoding="utf-8", copybufsize=MiB)
        for item in self.items:
            if item[0] == "entry":
                _, ti, data, fmt = item
                tf.format = fmt if fmt is not None else tarfile.PAX_FORMAT
                if data is None:
                    tf.addfile(ti)
                elif isinstance(data, Stream):
                    tf.addfile(ti, _IterReader(data.factory()))
                else:
                    tf.addfile(ti, io.BytesIO(data))
            else:
                raw = _gnu_sparse_member(self._name(item[1]), *item[2:])
                tf.fileobj.write(raw)
                tf.offset += len(raw)
        tf.format = tarfile.PAX_FORMAT
        tf.close()

    def tar_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.write_tar(buf)
        return buf.getvalue()


def _gnu_sparse_member(name, size, extents, mode, uid, gid, mtime) -> bytes:
    """One GNU-format sparse member (header + data, no end blocks) from GNU tar."""
    with tempfile.TemporaryDirectory(prefix="ocigen-sparse-") as tmp:
        p = os.path.join(tmp, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.truncate(size)
            for off, data in extents:
                f.seek(off)
                f.write(data)
        os.chmod(p, mode)
        os.utime(p, (mtime, mtime))
        out = subprocess.run(
            ["tar", "--sparse", "--format=gnu", "--numeric-owner", f"--owner=+{uid}",
             f"--group=+{gid}", "--no-recursion", "-C", tmp, "-cf", "-", name],
            check=True, stdout=subprocess.PIPE).stdout
    tf = tarfile.open(fileobj=io.BytesIO(out), mode="r:")
    m = tf.next()
    if m is None or not m.issparse() or m.size != size:
        raise RuntimeError(f"GNU tar did not write {name!r} as a sparse member")
    return out[:tf.offset]


# --------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------

def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


class Layout:
    """An OCI image layout directory being written.

    ``docker=True`` writes Docker v2 schema 2 manifests, configs, manifest
    lists and gzip layer media types (index.json stays OCI, as skopeo does).
    """

    def __init__(self, root: str, docker: bool = False):
        self.root = root
        self.docker = docker
        self.blobs = os.path.join(root, "blobs", "sha256")
        os.makedirs(self.blobs, exist_ok=True)
        with open(os.path.join(root, "oci-layout"), "wb") as f:
            f.write(_json({"imageLayoutVersion": "1.0.0"}))
        self.layer_info: list[dict] = []  # one per layer written, in order

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.blobs, digest.split(":", 1)[1])

    def add_blob(self, data: bytes, media_type: str) -> dict:
        hexd = hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.blobs, hexd), "wb") as f:
            f.write(data)
        return {"mediaType": media_type, "digest": "sha256:" + hexd, "size": len(data)}

    def _layer_media(self, compression: str) -> str:
        if self.docker:
            if compression != "gzip":
                raise ValueError("Docker v2 layers are gzip only")
            return MT_DOCKER_LAYER
        return MT_OCI_LAYER[compression]

    def add_layer(self, layer: Layer) -> tuple[dict, str]:
        """Write, compress and store one layer; returns (descriptor, diff_id)."""
        fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                if layer.compression == "none":
                    w = _HashWriter(f)
                    layer.write_tar(w)
                else:
                    cmd = (["gzip", "-n", "-6", "-c"] if layer.compression == "gzip"
                           else ["zstd", "-q", "-3", "-T2", "-c"])
                    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=f)
                    w = _HashWriter(p.stdin)
                    try:
                        layer.write_tar(w)
                    finally:
                        p.stdin.close()
                        if p.wait() != 0:
                            raise RuntimeError(f"{cmd[0]} failed")
            hexd = _sha256_file(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, os.path.join(self.blobs, hexd))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        desc = {"mediaType": self._layer_media(layer.compression),
                "digest": "sha256:" + hexd, "size": os.path.getsize(os.path.join(self.blobs, hexd))}
        diff_id = "sha256:" + w.sha.hexdigest()
        self.layer_info.append({"digest": desc["digest"], "diff_id": diff_id,
                                "compression": layer.compression, "tar_size": w.n,
                                "blob_size": desc["size"]})
        return desc, diff_id

    def add_raw_layer(self, data: bytes, compression: str, diff_id: str) -> tuple[dict, str]:
        """Store prepared (possibly broken) layer bytes as they are."""
        desc = self.add_blob(data, self._layer_media(compression))
        self.layer_info.append({"digest": desc["digest"], "diff_id": diff_id,
                                "compression": compression, "tar_size": None,
                                "blob_size": len(data)})
        return desc, diff_id

    def add_image(self, layers: list, platform: str = "linux/amd64", config: dict | None = None,
                  diff_ids: list | None = None, config_media_type: str | None = None) -> dict:
        """Write the layers (Layer, or (descriptor, diff_id) already stored),
        a config and a manifest; returns the manifest descriptor with platform.
        ``diff_ids`` and ``config_media_type`` replace the right ones (bad images)."""
        descs, real_diff_ids = [], []
        for layer in layers:
            d, diff = self.add_layer(layer) if isinstance(layer, Layer) else layer
            descs.append(d)
            real_diff_ids.append(diff)
        if diff_ids is None:
            diff_ids = real_diff_ids
        os_, arch, *variant = platform.split("/")
        cfg = {"created": CREATED, "architecture": arch, "os": os_,
               "config": config or {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                                    "Cmd": ["/bin/sh"]},
               "rootfs": {"type": "layers", "diff_ids": diff_ids},
               "history": [{"created": CREATED, "created_by": f"ocigen layer {i}"}
                           for i in range(len(descs))]}
        if variant:
            cfg["variant"] = variant[0]
        cdesc = self.add_blob(_json(cfg), config_media_type
                              or (MT_DOCKER_CONFIG if self.docker else MT_OCI_CONFIG))
        mt = MT_DOCKER_MANIFEST if self.docker else MT_OCI_MANIFEST
        manifest = {"schemaVersion": 2, "mediaType": mt, "config": cdesc, "layers": descs}
        mdesc = self.add_blob(_json(manifest), mt)
        mdesc["platform"] = {"architecture": arch, "os": os_}
        if variant:
            mdesc["platform"]["variant"] = variant[0]
        return mdesc

    def add_index(self, manifests: list[dict]) -> dict:
        mt = MT_DOCKER_LIST if self.docker else MT_OCI_INDEX
        return self.add_blob(_json({"schemaVersion": 2, "mediaType": mt, "manifests": manifests}), mt)

    def finish(self, refs: list[tuple[dict, str | None]]) -> None:
        """Write index.json naming each (descriptor, tag)."""
        manifests = []
        for desc, tag in refs:
            d = dict(desc)
            if tag:
                d["annotations"] = {REF_NAME: tag}
            manifests.append(d)
        with open(os.path.join(self.root, "index.json"), "wb") as f:
            f.write(_json({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": manifests}))


# --------------------------------------------------------------------------
# The full-coverage image
# --------------------------------------------------------------------------

def _posix_acl(entries) -> bytes:
    """Linux xattr form of a POSIX ACL: u32 version 2, then (u16 tag, u16 perm, u32 id)."""
    out = (2).to_bytes(4, "little")
    for tag, perm, ident in entries:
        out += tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + ident.to_bytes(4, "little")
    return out


ACL_UNDEF = 0xFFFFFFFF
# user::rwx user:1000:r-x group::r-x mask::r-x other::r-- (matches mode 0754)
ACL_ACCESS = _posix_acl([(0x01, 7, ACL_UNDEF), (0x02, 5, 1000), (0x04, 5, ACL_UNDEF),
                         (0x10, 5, ACL_UNDEF), (0x20, 4, ACL_UNDEF)])
# default ACL for a 0755 directory: user::rwx group::r-x group:2000:rwx mask::rwx other::r-x
ACL_DEFAULT = _posix_acl([(0x01, 7, ACL_UNDEF), (0x04, 5, ACL_UNDEF), (0x08, 7, 2000),
                          (0x10, 7, ACL_UNDEF), (0x20, 5, ACL_UNDEF)])
# vfs_cap_data revision 2, effective, permitted = CAP_NET_BIND_SERVICE (bit 10)
CAP_NET_BIND = ((0x02000000 | 1).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little")
                + bytes(4) + bytes(8))

WIDE_FILES = 5000
MANY_DIRS, MANY_PER_DIR = 52, 100
DEEP_LEVELS = 24


ELF_MAGIC = b"\x7fELF"


def full_layers(sparse: bool = True, docker: bool = False) -> list[Layer]:
    """The full-coverage image: see the module docstring of the test suite."""
    c1, c2, c3 = ("gzip", "gzip", "gzip") if docker else ("gzip", "zstd", "none")
    dedup = blob("random", 3 * MiB + 17, seed=99)  # identical in layers 1 and 3

    # Layer 1: the base.
    l1 = Layer(c1)
    l1.dir("", 0o755)
    for d in ("etc", "usr", "usr/bin", "usr/lib", "dev", "run", "sizes", "names", "sym",
              "links", "modes", "owners", "xattr", "opq", "opq/sub", "gone", "gone/inner",
              "replace-dir", "replace-dir/child", "hl", "dedup", "times", "wide", "many", "deep"):
        l1.dir(d)
    l1.file("etc/hostname", b"kite-full\n")
    l1.file("etc/config", b"mode=lower\n", mode=0o644)
    l1.file("etc/delete-me", b"old content, deleted in layer 2\n")
    # ELF magic: `kite convert` cuts ELF files in finer chunks (--elf-chunk-size).
    l1.file("usr/bin/tool", ELF_MAGIC + blob("binary", 200_000 - 4, 1), mode=0o755)
    l1.file("usr/lib/libfoo.so.1", ELF_MAGIC + blob("binary", 1_500_000 - 4, 2), mode=0o755)
    for i in range(WIDE_FILES):  # one directory with 5000 entries, some empty
        l1.file(f"wide/entry-{i:05d}", b"" if i % 10 == 0 else f"wide file {i}\n".encode())
    for d in range(MANY_DIRS):
        l1.dir(f"many/d{d:02d}")
        for i in range(MANY_PER_DIR):
            l1.file(f"many/d{d:02d}/f{i:03d}.txt", f"{d}:{i}\n".encode() * (i % 7))
    deep = "deep"
    for i in range(DEEP_LEVELS):
        deep += f"/level-{i:02d}"
        l1.dir(deep)
    l1.file(deep + "/bottom.txt", b"at the bottom\n")
    for name, size in (("empty", 0), ("one", 1), ("4095", 4095), ("4096", 4096), ("4097", 4097),
                       ("1m-1", MiB - 1), ("1m", MiB), ("1m+1", MiB + 1), ("2m+3", 2 * MiB + 3)):
        l1.file("sizes/" + name, blob("text", size, seed=size))
    l1.file("sizes/zeros-1m", bytes(MiB))
    long255 = "n" * 255
    l1.file("names/" + long255, b"255-byte name\n")
    l1.file("names/" + "\u00e9" * 127 + "x", b"255 bytes of UTF-8\n")
    l1.dir("names/" + "d" * 255)
    l1.file("names/" + "d" * 255 + "/" + "f" * 255, b"255/255\n")
    for n in ("-a", "!b", "#c", "+d", ".hidden", "...", "..x", "a b", "Zed", "\u65e5\u672c"):
        l1.file("names/" + n, n.encode() + b"\n")
    l1.symlink("sym/rel", "../sizes/4096")
    l1.symlink("sym/abs", "/etc/hostname")
    l1.symlink("sym/dangling", "/nonexistent/nowhere")
    l1.symlink("sym/dir", "../usr")
    l1.symlink("sym/long", "/".join(f"component-{i:03d}" for i in range(100)))  # 1399 bytes
    l1.file("links/orig", b"hard linked content\n")
    l1.hardlink("links/hard1", "links/orig")
    l1.dir("links/sub")
    l1.hardlink("links/sub/hard2", "links/orig")
    l1.file("hl/x", b"x and y share an inode in layer 1\n")
    l1.hardlink("hl/y", "hl/x")
    l1.char("dev/null", 1, 3)
    l1.block("dev/sda1", 8, 1)
    l1.char("dev/bigdev", 4095, 1048575, mode=0o600)
    l1.block("dev/nvme", 259, 65536)
    l1.fifo("run/fifo", mode=0o620)
    l1.file("modes/setuid", b"#!/bin/sh\n", mode=0o4755)
    l1.file("modes/setgid", b"#!/bin/sh\n", mode=0o2755)
    l1.dir("modes/sticky", mode=0o1777)
    l1.file("modes/all", b"", mode=0o7777)
    l1.file("modes/none", b"", mode=0o000)
    l1.file("modes/private", b"secret\n", mode=0o600)
    l1.file("owners/big", b"", uid=70000, gid=70001)
    l1.file("owners/huge", b"", uid=3_000_000_000, gid=4_000_000_000)
    l1.dir("owners/dir", uid=100000, gid=100000)
    for i, t in enumerate((0, 1, 86400, 2**31 - 1, 2**31 + 5, 4_102_444_800, 1_234_567_890.5)):
        l1.file(f"times/t{i}", f"{t}\n".encode(), mtime=t)
    l1.dir("times/old-dir", mtime=1_000_000_000)
    l1.file("xattr/file", b"has xattrs\n", xattrs={
        "user.comment": "hello", "user.empty": b"", "user.binary": bytes(range(256)),
        "user.long": b"v" * 2000, "trusted.kite.test": b"trusted\x00value",
        "security.capability": CAP_NET_BIND})
    l1.file("xattr/acl", b"acl\n", mode=0o754, xattrs={"system.posix_acl_access": ACL_ACCESS})
    l1.dir("xattr/acl-dir", xattrs={"system.posix_acl_default": ACL_DEFAULT, "user.dir": "yes"})
    l1.symlink("xattr/link", "file", xattrs={"trusted.kite.link": "on a symlink"})
    many = {f"user.attr{i:02d}": f"value-{i}" for i in range(40)}
    l1.file("xattr/many", b"", xattrs=many)
    l1.file("opq/a", b"lower a\n")
    l1.file("opq/b", b"lower b\n")
    l1.file("opq/sub/c", b"lower c\n")
    l1.file("gone/file", b"deleted with its directory\n")
    l1.file("gone/inner/deep", b"also gone\n")
    l1.file("replace-dir/child/x", b"removed when a file replaces the dir\n")
    l1.file("replace-file", b"becomes a directory\n")
    l1.file("dedup/same-a.bin", dedup)
    l1.file("dedup/same-in-layer.bin", dedup)
    longdir = "long/" + "/".join(f"path-component-{i:02d}" for i in range(8))  # > 100 chars
    l1.dir("long")
    d = "long"
    for part in longdir.split("/")[1:]:
        d += "/" + part
        l1.dir(d)
    l1.file(longdir + "/a-file-with-a-long-path.txt", b"PAX long name\n")
    l1.hardlink("long/link-to-long-path", longdir + "/a-file-with-a-long-path.txt")
    if sparse:
        l1.dir("sparse")
        size = 4 * GiB + 8192
        l1.sparse("sparse/big.img", size, [
            (0, b"head" * 1024), (GiB + 5, b"one gig"), (4 * GiB - 2048, b"x" * 4096),
            (size - 100, b"t" * 100)])

    # Layer 2: whiteouts, opaque dir, overrides ("./" names, zstd).
    l2 = Layer(c2, prefix="./", mtime=MTIME + 100)
    l2.dir("etc")
    l2.whiteout("etc/delete-me")
    l2.whiteout("gone")
    l2.whiteout("never-existed")
    l2.dir("opq", mode=0o750)
    l2.file("opq/new1", b"upper, before the marker\n")
    l2.opaque("opq")
    l2.file("opq/new2", b"upper, after the marker\n")
    l2.file("replace-dir", b"a file where a directory was\n")
    l2.dir("replace-file")
    l2.file("replace-file/inside", b"inside\n")
    l2.dir("hl")
    l2.file("hl/x", b"x rewritten; y keeps the old inode\n")
    l2.dir("usr")
    l2.dir("usr/lib", mode=0o750, mtime=MTIME + 200)  # metadata change, children stay
    l2.file("usr/lib/big-compressible", blob("text", 3 * MiB, 5))
    l2.file("etc/config", b"mode=upper, different\n", mode=0o600, uid=1000, gid=1000)

    # Layer 3: re-create, links to lower files, GNU names, implicit parents.
    l3 = Layer(c3, mtime=MTIME + 300)
    l3.dir("etc")
    l3.file("etc/delete-me", b"re-created in layer 3\n", mode=0o640)
    l3.dir("links")
    l3.hardlink("links/to-lower", "usr/bin/tool", mode=0o755)
    l3.hardlink("links/to-lower-2", "links/orig")
    l3.dir("other")
    l3.file("other/same-b.bin", dedup)
    l3.dir("gnu")
    gnu = "gnu/" + "g" * 90 + "/" + "h" * 90
    l3.dir("gnu/" + "g" * 90, fmt=tarfile.GNU_FORMAT)
    l3.file(gnu, b"GNU long name entry\n", fmt=tarfile.GNU_FORMAT)
    l3.symlink("gnu/longlink", "t" * 150, fmt=tarfile.GNU_FORMAT)
    l3.file("implicit/parent/dirs/file", b"parents are implicit\n")
    return [l1, l2, l3]


def build_full(out: str, docker: bool = False, sparse: bool = True) -> dict:
    lay = Layout(out, docker=docker)
    amd64 = lay.add_image(full_layers(sparse, docker), "linux/amd64")
    arm = Layer("gzip")
    arm.dir("")
    arm.file("etc/hostname", b"arm64 variant\n")
    arm64 = lay.add_image([arm], "linux/arm64/v8")
    idx = lay.add_index([amd64, arm64])
    lay.finish([(idx, "latest")])
    return {"ref": f"oci:{out}:latest", "layers": lay.layer_info[:3]}


# --------------------------------------------------------------------------
# The README example image
# --------------------------------------------------------------------------

HELLO_SH = b"""#!/bin/sh
# Greets from a lazily loaded image.
echo "hello from kite: this file was fetched on first read"
"""
STATS_PY = b"""#!/usr/bin/env python3
\"\"\"Sums the demo CSV files shipped with the example image.\"\"\"
import csv, glob, os
here = os.path.dirname(os.path.abspath(__file__))
total = 0
for path in sorted(glob.glob(os.path.join(here, "..", "data", "*.csv"))):
    with open(path) as f:
        total += sum(int(row["count"]) for row in csv.DictReader(f))
print("rows counted:", total)
"""


def example_layers() -> list[Layer]:
    base = Layer("gzip")
    for d in ("", "etc", "usr", "usr/lib", "usr/share", "usr/share/doc", "usr/share/doc/demo", "tmp"):
        base.dir(d, mode=0o1777 if d == "tmp" else 0o755)
    base.file("etc/os-release", b'NAME="kite demo"\nID=kite-demo\nVERSION_ID=1\n')
    base.file("usr/lib/libdemo.so.1.0", Stream.of("binary", 12 * MiB, 1), mode=0o755)
    base.symlink("usr/lib/libdemo.so.1", "libdemo.so.1.0")
    base.file("usr/share/doc/demo/manual.txt", Stream.of("text", 6 * MiB, 2))

    runtime = Layer("zstd")
    for d in ("opt", "opt/app", "opt/app/data", "opt/app/models"):
        runtime.dir(d)
    r = random.Random(3)
    for i in range(8):
        rows = "".join(f"{r.randrange(10**6)},item-{r.randrange(1000)},{r.randrange(100)}\n"
                       for _ in range(40000))
        runtime.file(f"opt/app/data/part-{i}.csv", ("id,name,count\n" + rows).encode())
    runtime.file("opt/app/models/weights.bin", Stream.of("random", 16 * MiB, 3))

    app = Layer("gzip")
    app.dir("opt")
    app.dir("opt/app")
    app.dir("opt/app/bin")
    app.file("opt/app/bin/hello.sh", HELLO_SH, mode=0o755)
    app.file("opt/app/bin/stats.py", STATS_PY, mode=0o755)
    app.file("opt/app/README", b"A small demo app for kite's README.\n")
    app.file("opt/app/config.toml", b'[server]\nport = 8080\nworkers = 2\n', mode=0o640, uid=1000, gid=1000)
    return [base, runtime, app]


def build_example(out: str) -> dict:
    lay = Layout(out)
    m = lay.add_image(example_layers(), "linux/amd64",
                      config={"Cmd": ["/opt/app/bin/hello.sh"], "WorkingDir": "/opt/app"})
    lay.finish([(m, "latest")])
    return {"ref": f"oci:{out}:latest", "layers": lay.layer_info}


def build_pair(out1: str, out2: str) -> dict:
    """Two images sharing the example image's base layer byte for byte,
    each with a top layer of its own (for shared-layer cache tests)."""
    images = []
    for i, out in enumerate((out1, out2)):
        top = Layer("gzip")
        top.dir("app")
        top.file(f"app/only-{i}.bin", Stream.of("random", 2 * MiB, 10 + i))
        top.file(f"app/note-{i}.txt", f"image {i}\n".encode())
        lay = Layout(out)
        m = lay.add_image([example_layers()[0], top], "linux/amd64")
        lay.finish([(m, "latest")])
        images.append({"ref": f"oci:{out}:latest", "layers": lay.layer_info})
    return {"images": images}


# --------------------------------------------------------------------------
# Runnable images (containerd tests): a static busybox, so a container can
# run a command, and a payload the command does not read
# --------------------------------------------------------------------------

BUSYBOX_APPLETS = ("sh", "cat", "sleep", "ls", "head", "wc", "true", "sha256sum")


def busybox_path() -> str:
    for p in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.exists(p):
            return p
    raise SystemExit("ocigen: runnable images need a static busybox (apt-get install busybox-static)")


def runnable_layers(payload_mb: int, message: str) -> list[Layer]:
    base = Layer("gzip")
    for d in ("", "bin", "etc", "proc", "sys", "dev", "tmp", "run", "app"):
        base.dir(d, mode=0o1777 if d == "tmp" else 0o755)
    with open(busybox_path(), "rb") as f:
        base.file("bin/busybox", f.read(), mode=0o755)
    for a in BUSYBOX_APPLETS:
        base.symlink(f"bin/{a}", "busybox")
    base.file("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n")
    base.file("etc/group", b"root:x:0:\n")
    # What a runtime bind-mounts over; present, so runc creates nothing.
    for f in ("etc/hosts", "etc/hostname", "etc/resolv.conf"):
        base.file(f, b"")
    layers = [base]
    if payload_mb > 0:
        data = Layer("zstd")
        data.dir("app")
        data.dir("app/data")
        per = 16 * MiB
        left, i = payload_mb * MiB, 0
        while left > 0:
            n = min(per, left)
            data.file(f"app/data/part-{i:02d}.bin", Stream.of("random", n, 500 + i))
            left -= n
            i += 1
        layers.append(data)
    app = Layer("gzip")
    app.dir("app")
    app.file("app/message.txt", message.encode() + b"\n")
    layers.append(app)
    return layers


def build_runnable(out: str, payload_mb: int, cmd: list, message: str) -> dict:
    lay = Layout(out)
    m = lay.add_image(runnable_layers(payload_mb, message), "linux/amd64",
                      config={"Env": ["PATH=/bin"], "Cmd": cmd, "WorkingDir": "/app"})
    lay.finish([(m, "latest")])
    return {"ref": f"oci:{out}:latest", "layers": lay.layer_info}


# --------------------------------------------------------------------------
# The benchmark image
# --------------------------------------------------------------------------

# (name, share of bytes, compression in "mixed" mode, content mix)
BIG_LAYERS = (
    ("base-os", 0.15, "gzip", {"text": 0.5, "binary": 0.4, "random": 0.1}),
    ("runtime-libs", 0.30, "gzip", {"text": 0.2, "binary": 0.6, "random": 0.2}),
    ("python-packages", 0.25, "zstd", {"text": 0.6, "binary": 0.3, "random": 0.1}),
    ("model-and-data", 0.30, "zstd", {"text": 0.3, "binary": 0.2, "random": 0.5}),
)


def big_layers(size_gb: float, compression: str = "mixed") -> list[Layer]:
    """A ~size_gb GB image: many small files plus large files, four layers."""
    total = int(size_gb * 1e9)
    layers, shared = [], []
    for li, (name, share, comp, mix) in enumerate(BIG_LAYERS):
        r = random.Random(1000 + li)
        layer = Layer(comp if compression == "mixed" else compression)
        budget = int(total * share)
        layer.dir("")
        layer.dir(name)
        # ~5% of the bytes in small files (100 B .. 16 KiB), many of them.
        small_budget, n = budget // 20, 0
        ndirs = 0
        while small_budget > 0:
            if n % 200 == 0:
                layer.dir(f"{name}/small-{ndirs:03d}")
                ndirs += 1
            sz = min(int(r.lognormvariate(7.5, 1.2)), 16384, small_budget)
            kind = "text" if r.random() < 0.8 else "binary"
            layer.file(f"{name}/small-{ndirs - 1:03d}/f{n:05d}", blob(kind, sz, r.getrandbits(32)))
            small_budget -= sz
            budget -= sz
            n += 1
        layer.dir(f"{name}/large")
        kinds, weights = zip(*mix.items())
        i = 0
        if li == 3 and shared:  # some files repeated from a lower layer (dedup)
            for path, s in shared:
                layer.file(f"{name}/large/copy-{i:04d}", s)
                budget -= s.size
                i += 1
        while budget > 0:
            sz = min(int(r.lognormvariate(14.5, 1.5)) + 4096, 256 * MiB, budget)
            s = Stream.of(r.choices(kinds, weights)[0], sz, r.getrandbits(32))
            layer.file(f"{name}/large/file-{i:04d}", s, mode=0o755 if i % 3 == 0 else 0o644)
            if li == 1 and len(shared) < 8 and sz < 32 * MiB:
                shared.append((f"{name}/large/file-{i:04d}", s))
            budget -= sz
            i += 1
        layers.append(layer)
    return layers


def _write_big_layer(job) -> tuple[dict, str, dict]:
    out, size_gb, compression, i = job
    lay = Layout(out)
    desc, diff_id = lay.add_layer(big_layers(size_gb, compression)[i])
    return desc, diff_id, lay.layer_info[0]


def build_big(out: str, size_gb: float = 2.0, compression: str = "mixed") -> dict:
    """Layers are written two at a time, each by its own process (2 cores)."""
    lay = Layout(out)
    jobs = [(out, size_gb, compression, i) for i in range(len(BIG_LAYERS))]
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as ex:
        done = list(ex.map(_write_big_layer, jobs))
    lay.layer_info = [info for _, _, info in done]
    m = lay.add_image([(desc, diff_id) for desc, diff_id, _ in done], "linux/amd64")
    lay.finish([(m, "latest")])
    return {"ref": f"oci:{out}:latest", "layers": lay.layer_info,
            "tar_bytes": sum(x["tar_size"] for x in lay.layer_info)}


# --------------------------------------------------------------------------
# Bad-input images
# --------------------------------------------------------------------------

BAD_KINDS = ("truncated-gzip", "corrupt-zstd", "truncated-tar", "dotdot-entry", "absolute-path",
             "symlink-escape", "hardlink-missing", "long-name", "digest-mismatch", "no-platform",
             "dot-whiteout", "dotdot-whiteout", "big-device", "size-mismatch", "zero-diff-ids",
             "wrong-diff-id", "diff-id-count", "text-plain-config")
CULPRIT = "data/culprit.bin"


def _good(n: int) -> Layer:
    lay = Layer("gzip", mtime=MTIME + n)
    if n == 1:
        lay.dir("")
    lay.dir(f"good{n}")
    lay.file(f"good{n}/hello.txt", f"good layer {n}\n".encode())
    return lay


def _culprit_layer() -> tuple[bytes, int]:
    """A tar with a 512 KiB file; returns (tar bytes, offset inside its data)."""
    lay = Layer("none")
    lay.dir("data")
    lay.file("data/before.txt", b"fine\n")
    lay.file(CULPRIT, blob("text", 512 * 1024, 42))
    lay.file("data/after.txt", b"never reached\n")
    tar = lay.tar_bytes()
    tf = tarfile.open(fileobj=io.BytesIO(tar), mode="r:")
    m = tf.getmember(CULPRIT)
    return tar, m.offset_data + m.size // 2


def _zstd(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-3", "-c", "--no-check"], input=data,
                          stdout=subprocess.PIPE, check=True).stdout


def _zstd_first_block(frame: bytes) -> int:
    """Offset of the first block header in a zstd frame (RFC 8878 3.1.1.1)."""
    assert frame[:4] == b"\x28\xb5\x2f\xfd"
    fhd = frame[4]
    single = (fhd >> 5) & 1
    did = (0, 1, 2, 4)[fhd & 3]
    fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
    return 5 + (0 if single else 1) + did + fcs


def _build_bad_config(kind: str, out: str) -> dict:
    """Good layers, a config that does not fit them. ``names``: what the
    error must say besides the layer."""
    lay = Layout(out)
    mid = Layer("none", mtime=MTIME + 2)
    mid.dir("data")
    mid.file("data/ok.txt", b"ok\n")
    layers = [lay.add_layer(_good(1)), lay.add_layer(mid), lay.add_layer(_good(3))]
    diff_ids = [d for _, d in layers]
    layer, names, mt = None, [], None
    zero = "sha256:" + "0" * 64
    if kind == "zero-diff-ids":
        # The first layer is the first to be checked.
        diff_ids = [zero] * len(layers)
        layer, names = layers[0][0]["digest"], [zero, layers[0][1]]
    elif kind == "wrong-diff-id":
        # An uncompressed layer claiming another layer's diff_id.
        diff_ids[1] = layers[0][1]
        layer, names = layers[1][0]["digest"], [layers[0][1], layers[1][1]]
    elif kind == "diff-id-count":
        diff_ids = diff_ids[:2]
        names = ["2 rootfs.diff_ids for 3 layers"]
    else:
        mt = "text/plain"
        names = ['"text/plain"']
    m = lay.add_image(layers, diff_ids=diff_ids, config_media_type=mt)
    lay.finish([(m, "latest")])
    return {"kind": kind, "layer_digest": layer, "entry": None, "names": names,
            "ref": f"oci:{out}:latest"}


def build_bad(kind: str, out: str) -> dict:
    if kind not in BAD_KINDS:
        raise SystemExit(f"ocigen: unknown bad kind {kind!r}; one of {', '.join(BAD_KINDS)}")
    if kind in ("zero-diff-ids", "wrong-diff-id", "diff-id-count", "text-plain-config"):
        return _build_bad_config(kind, out)
    lay = Layout(out)
    good1 = lay.add_layer(_good(1))
    entry = None
    if kind == "size-mismatch":
        # Content and digest agree; the descriptor's size is one too many.
        tar, _ = _culprit_layer()
        desc, diff_id = lay.add_raw_layer(tar, "none", "sha256:" + hashlib.sha256(tar).hexdigest())
        bad = (dict(desc, size=desc["size"] + 1), diff_id)
    elif kind in ("truncated-gzip", "corrupt-zstd", "truncated-tar", "digest-mismatch"):
        tar, cut = _culprit_layer()
        diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
        entry = CULPRIT
        if kind == "truncated-gzip":
            co = zlib.compressobj(6, zlib.DEFLATED, 31)
            data = co.compress(tar[:cut]) + co.flush(zlib.Z_FULL_FLUSH)
            bad = lay.add_raw_layer(data, "gzip", diff_id)
        elif kind == "corrupt-zstd":
            first, second = _zstd(tar[:cut]), bytearray(_zstd(tar[cut:]))
            second[_zstd_first_block(second)] |= 0x06  # block type 3: reserved
            bad = lay.add_raw_layer(first + bytes(second), "zstd", diff_id)
        elif kind == "truncated-tar":
            data = zlib.compress(tar[:cut], 6, 31)
            bad = lay.add_raw_layer(data, "gzip", "sha256:" + hashlib.sha256(tar[:cut]).hexdigest())
        else:
            desc, _ = lay.add_raw_layer(tar, "none", diff_id)
            flipped = bytearray(tar)
            flipped[cut] ^= 0x01
            with open(lay.blob_path(desc["digest"]), "wb") as f:
                f.write(flipped)
            bad = (desc, diff_id)
            entry = None
    elif kind == "no-platform":
        bad = None
    else:
        b = Layer("gzip", mtime=MTIME + 2)
        b.dir("data")
        b.file("data/ok.txt", b"ok\n")
        if kind == "dotdot-entry":
            entry = "data/../../escape.txt"
            b.add(tarfile.TarInfo(entry), b"escaped\n")
        elif kind == "absolute-path":
            entry = "/etc/evil.txt"
            b.add(tarfile.TarInfo(entry), b"absolute\n")
        elif kind == "symlink-escape":
            b.symlink("a", "/etc")
            entry = "a/passwd"
            b.file(entry, b"root::0:0::/:/bin/sh\n")
        elif kind == "hardlink-missing":
            entry = "data/link"
            b.hardlink(entry, "data/no-such-file")
        elif kind == "long-name":
            entry = "data/" + "L" * 256
            b.file(entry, b"name component of 256 bytes\n")
        elif kind in ("dot-whiteout", "dotdot-whiteout"):
            entry = "data/.wh.." if kind == "dot-whiteout" else "data/.wh..."
            b.add(tarfile.TarInfo(entry), b"")
        elif kind == "big-device":
            entry = "data/huge-dev"
            b.char(entry, 2097151, 2097151)
        for ti in b.items:
            ti[1].mtime = MTIME + 2
        bad = lay.add_layer(b)
    good3 = lay.add_layer(_good(3))
    if kind == "no-platform":
        m = lay.add_image([good1, lay.add_layer(_good(2)), good3], "linux/s390x")
        lay.finish([(lay.add_index([m]), "latest")])
        return {"kind": kind, "layer_digest": None, "entry": None, "ref": f"oci:{out}:latest"}
    m = lay.add_image([good1, bad, good3], "linux/amd64")
    lay.finish([(m, "latest")])
    return {"kind": kind, "layer_digest": bad[0]["digest"], "entry": entry, "ref": f"oci:{out}:latest"}


STALLED_SIZE = 1 << 40


def build_stalled(out: str) -> dict:
    """An image whose second layer (uncompressed tar) is a named pipe, so a
    test decides when and how fast a conversion reads it: nothing (it
    blocks), or ``tar_head`` (hex: the header of one file of
    ``STALLED_SIZE`` - 1 MiB bytes) then zeros as long as it likes."""
    lay = Layout(out)
    good1 = lay.add_layer(_good(1))
    # The descriptor names bytes nobody will finish writing.
    fake = "sha256:" + hashlib.sha256(b"stalled").hexdigest()
    desc = {"mediaType": MT_OCI_LAYER["none"], "digest": fake, "size": STALLED_SIZE}
    fifo = lay.blob_path(fake)
    os.mkfifo(fifo)
    m = lay.add_image([good1, (desc, fake)])
    lay.finish([(m, "latest")])
    ti = tarfile.TarInfo("endless.bin")
    ti.size, ti.mtime, ti.mode = STALLED_SIZE - MiB, MTIME, 0o644
    head = ti.tobuf(format=tarfile.PAX_FORMAT)
    return {"ref": f"oci:{out}:latest", "fifo": fifo, "tar_head": head.hex()}


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("full", help="full-coverage test image")
    p.add_argument("out")
    p.add_argument("--docker", action="store_true", help="Docker v2 schema 2 media types")
    p.add_argument("--no-sparse", action="store_true", help="leave out the 4 GiB sparse file")
    p = sub.add_parser("example", help="small demo image for the README")
    p.add_argument("out")
    p = sub.add_parser("big", help="benchmark image")
    p.add_argument("out")
    p.add_argument("--size-gb", type=float, default=2.0)
    p.add_argument("--compression", choices=("mixed", "gzip", "zstd", "none"), default="mixed")
    p = sub.add_parser("pair", help="two images sharing their base layer")
    p.add_argument("out")
    p.add_argument("out2")
    p = sub.add_parser("runnable", help="container image with a static busybox")
    p.add_argument("out")
    p.add_argument("--payload-mb", type=int, default=64)
    p.add_argument("--cmd", dest="command", default='["/bin/cat", "/app/message.txt"]', help="config Cmd as JSON")
    p.add_argument("--message", default="hello from a kite image")
    p = sub.add_parser("bad", help="image with one bad layer")
    p.add_argument("kind", choices=BAD_KINDS)
    p.add_argument("out")
    p = sub.add_parser("stalled", help="image whose second layer is a named pipe")
    p.add_argument("out")
    a = ap.parse_args(argv)
    if os.path.exists(a.out) and os.listdir(a.out):
        ap.error(f"{a.out} exists and is not empty")
    for tool in ("gzip", "zstd", "tar"):
        if shutil.which(tool) is None:
            ap.error(f"needs the {tool} CLI (apt-get install {tool})")
    if a.cmd == "full":
        res = build_full(a.out, docker=a.docker, sparse=not a.no_sparse)
    elif a.cmd == "example":
        res = build_example(a.out)
    elif a.cmd == "pair":
        res = build_pair(a.out, a.out2)
    elif a.cmd == "runnable":
        res = build_runnable(a.out, a.payload_mb, json.loads(a.command), a.message)
    elif a.cmd == "big":
        res = build_big(a.out, a.size_gb, a.compression)
    elif a.cmd == "stalled":
        res = build_stalled(a.out)
    else:
        res = build_bad(a.kind, a.out)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
