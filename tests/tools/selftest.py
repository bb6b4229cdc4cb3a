#!/usr/bin/env python3
"""Self-test of the test tools: ocigen, refapply, treemanifest, manifestdiff.

This file owns the checks that the tools agree with each other and with GNU
tar, without kite:
- extract the full image's layers with GNU tar (as root: --xattrs,
  --same-owner), applying whiteouts with a small helper, and compare
  ``treemanifest`` of that tree with ``refapply`` of the image;
- compare ``refapply dir:X`` (GNU tar + tarfile) with ``treemanifest X``;
- every ``ocigen bad`` image makes refapply fail naming the layer digest
  (and the tar entry and whatever else, when ocigen names them);
- ocigen output is deterministic; manifestdiff reports differences.

    python3 tests/tools/selftest.py [-k NAME]

Ends with the line "N passed, N failed"; exit 1 on any failure. The tar
extraction check needs root (device nodes, ownership, trusted.* xattrs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import manifestdiff  # noqa: E402
import ocigen  # noqa: E402
import refapply  # noqa: E402
import treemanifest  # noqa: E402


def tool(name, *args, check=True):
    p = subprocess.run([sys.executable, os.path.join(HERE, name), *args],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{name} {' '.join(args)} exited {p.returncode}:\n{p.stderr}{p.stdout[-2000:]}")
    return p


def _layers(layout: str):
    """(blob path, compression) of the linux/amd64 image's layers."""
    lay = refapply.OciLayout(layout)
    m, _ = refapply.select_manifest(lay, None, "linux/amd64")
    return [(lay.path(d["digest"]), refapply.LAYER_COMPRESSION[d["mediaType"]]) for d in m["layers"]]


def _decompress_cmd(comp):
    return {"gzip": ["gzip", "-dc"], "zstd": ["zstd", "-dcq"], "none": ["cat"]}[comp]


def _rm(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def tar_extract_image(layout: str, dest: str) -> None:
    """Apply the image's layers to ``dest`` with GNU tar plus whiteout handling."""
    dir_mtimes = {}
    for blob, comp in _layers(layout):
        raw = subprocess.run(_decompress_cmd(comp) + [blob], stdout=subprocess.PIPE, check=True).stdout
        members = tarfile.open(fileobj=__import__("io").BytesIO(raw), mode="r:").getmembers()
        norm = [(m, "/".join(refapply.split_path(m.name))) for m in members]
        for m, p in norm:  # whiteouts and opaque markers act on the lower layers
            head, _, base = p.rpartition("/")
            if base == ".wh..wh..opq":
                d = os.path.join(dest, head)
                if os.path.isdir(d) and not os.path.islink(d):
                    for child in os.listdir(d):
                        _rm(os.path.join(d, child))
            elif base.startswith(".wh."):
                _rm(os.path.join(dest, head, base[4:]))
        for m, p in norm:  # type changes: tar itself won't replace a dir by a file
            full = os.path.join(dest, p)
            if p and os.path.lexists(full):
                is_dir = os.path.isdir(full) and not os.path.islink(full)
                if is_dir != m.isdir():
                    _rm(full)
            if m.isdir():
                dir_mtimes[p] = int(m.mtime)
        subprocess.run(["tar", "-x", "--xattrs", "--xattrs-include=*", "--same-owner", "--numeric-owner",
                        "-p", "--exclude=.wh.*", "-C", dest, "-f", "-"], input=raw, check=True,
                       stderr=subprocess.DEVNULL)
    # Whiteouts and later layers touched directory mtimes; put back the last
    # recorded ones, and the applier's convention (0) for implicit parents.
    for dirpath, dirnames, _ in os.walk(dest, topdown=False):
        rel = os.path.relpath(dirpath, dest)
        rel = "" if rel == "." else rel
        t = dir_mtimes.get(rel, refapply.IMPLICIT_MTIME)
        os.utime(dirpath, (t, t), follow_symlinks=False)


# --------------------------------------------------------------------------

def test_full_image_vs_tar_extraction(tmp):
    if os.geteuid() != 0:
        return "skipped (needs root)"
    t = time.time()
    tool("ocigen.py", "full", f"{tmp}/img")
    gen = time.time() - t
    t = time.time()
    tool("refapply.py", f"oci:{tmp}/img:latest", "-o", f"{tmp}/ref.json")
    ref = time.time() - t
    os.mkdir(f"{tmp}/x")
    tar_extract_image(f"{tmp}/img", f"{tmp}/x")
    t = time.time()
    tool("treemanifest.py", f"{tmp}/x", "-o", f"{tmp}/tree.json")
    walk = time.time() - t
    p = tool("manifestdiff.py", f"{tmp}/ref.json", f"{tmp}/tree.json", check=False)
    assert p.returncode == 0, p.stdout
    entries = json.load(open(f"{tmp}/ref.json"))["entries"]
    files = sum(1 for e in entries.values() if e["type"] == "file")
    assert files >= 10_000, files
    for path in ("/etc/delete-me", "/opq/new1", "/opq/new2", "/sparse/big.img", "/links/to-lower"):
        assert path in entries, path
    for path in ("/gone", "/opq/a", "/opq/sub", "/replace-dir/child", "/etc/.wh.delete-me"):
        assert path not in entries, path
    assert entries["/hl/y"]["sha256"] != entries["/hl/x"]["sha256"]
    assert entries["/usr/bin/tool"]["link_group"] == "/links/to-lower"

    # The same tree through dir: (GNU tar create -> tarfile) must agree too.
    tool("refapply.py", f"dir:{tmp}/x", "-o", f"{tmp}/dir.json")
    p = tool("manifestdiff.py", f"{tmp}/dir.json", f"{tmp}/tree.json", check=False)
    assert p.returncode == 0, p.stdout
    return f"{files} files; ocigen {gen:.1f}s, refapply {ref:.1f}s, treemanifest {walk:.1f}s"


def test_docker_media_types(tmp):
    tool("ocigen.py", "full", "--docker", "--no-sparse", f"{tmp}/d")
    tool("ocigen.py", "full", "--no-sparse", f"{tmp}/o")
    idx = json.load(open(f"{tmp}/d/index.json"))["manifests"][0]
    assert idx["mediaType"] == ocigen.MT_DOCKER_LIST
    tool("refapply.py", f"oci:{tmp}/d", "-o", f"{tmp}/d.json")
    tool("refapply.py", f"oci:{tmp}/o:latest", "-o", f"{tmp}/o.json")
    p = tool("manifestdiff.py", f"{tmp}/d.json", f"{tmp}/o.json", check=False)
    assert p.returncode == 0, p.stdout
    arm = tool("refapply.py", f"oci:{tmp}/d", "--platform", "linux/arm64").stdout
    assert "arm64" not in arm and "/etc/hostname" in arm and len(json.loads(arm)["entries"]) == 3


def test_deterministic(tmp):
    a = tool("ocigen.py", "full", f"{tmp}/a").stdout
    b = tool("ocigen.py", "full", f"{tmp}/b").stdout
    assert a.replace(f"{tmp}/a", "") == b.replace(f"{tmp}/b", "")
    assert open(f"{tmp}/a/index.json").read() == open(f"{tmp}/b/index.json").read()


def test_example_image(tmp):
    info = json.loads(tool("ocigen.py", "example", f"{tmp}/ex").stdout)
    size = sum(x["tar_size"] for x in info["layers"])
    assert 20e6 <= size <= 60e6, size
    m = json.loads(tool("refapply.py", info["ref"]).stdout)["entries"]
    assert m["/opt/app/bin/hello.sh"]["mode"] == 0o755
    return f"{size / 1e6:.0f} MB uncompressed"


def test_bad_images(tmp):
    lines = []
    for kind in ocigen.BAD_KINDS:
        info = json.loads(tool("ocigen.py", "bad", kind, f"{tmp}/{kind}").stdout)
        assert info["kind"] == kind
        p = tool("refapply.py", info["ref"], check=False)
        assert p.returncode == 2, (kind, p.returncode, p.stderr)
        if info["layer_digest"]:
            assert info["layer_digest"] in p.stderr, (kind, p.stderr)
        elif not info.get("names"):
            assert "platform" in p.stderr, (kind, p.stderr)
        for name in info.get("names", []):
            assert name in p.stderr, (kind, name, p.stderr)
        if info["entry"]:
            assert repr(info["entry"]) in p.stderr, (kind, p.stderr)
        lines.append(p.stderr.strip())
    return "\n      " + "\n      ".join(line[:150] for line in lines)


def test_manifestdiff_reports(tmp):
    base = {"entries": {"/": {"type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "mtime": 0, "xattrs": {}},
                        "/a": {"type": "file", "mode": 0o644, "uid": 0, "gid": 0, "mtime": 5,
                               "xattrs": {"user.x": "01"}, "size": 1, "sha256": "aa"}}}
    other = json.loads(json.dumps(base))
    other["entries"]["/a"]["mode"] = 0o4755
    other["entries"]["/a"]["xattrs"] = {"user.x": "02"}
    other["entries"]["/b"] = other["entries"]["/a"]
    other["entries"]["/"]["mtime"] = 9
    for name, m in (("a", base), ("b", other)):
        json.dump(m, open(f"{tmp}/{name}.json", "w"))
    p = tool("manifestdiff.py", f"{tmp}/a.json", f"{tmp}/b.json", check=False)
    assert p.returncode == 1
    assert "~ /a: mode: 0o644 != 0o4755" in p.stdout and "+ /b: only in B" in p.stdout, p.stdout
    assert "xattr user.x" in p.stdout and "4 differences" in p.stdout, p.stdout
    p = tool("manifestdiff.py", f"{tmp}/a.json", f"{tmp}/a.json", check=False)
    assert p.returncode == 0 and "identical" in p.stdout
    d = manifestdiff.diff(base, other, ignore=["mode", "xattrs"], ignore_dir_mtime=True)
    assert [k for k, _ in d] == ["extra"], d


def test_treemanifest_hardlinks_and_xattrs(tmp):
    root = f"{tmp}/t"
    os.makedirs(f"{root}/d")
    with open(f"{root}/d/f", "wb") as f:
        f.write(b"abc")
    os.link(f"{root}/d/f", f"{root}/-early")
    os.symlink("d/f", f"{root}/s")
    os.setxattr(f"{root}/d/f", "user.k", b"\x00\xff")
    m = treemanifest.tree_manifest(root)["entries"]
    assert m["/d/f"]["link_group"] == "/-early" and m["/-early"]["link_group"] == "/-early"
    assert m["/d/f"]["xattrs"] == {"user.k": "00ff"}
    assert m["/s"] == {**m["/s"], "type": "symlink", "target": "d/f"}
    assert m["/d/f"]["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


TESTS = [v for k, v in list(globals().items()) if k.startswith("test_")]


def main() -> int:
    ap = argparse.ArgumentParser(description="Self-test of kite's test tools.")
    ap.add_argument("-k", help="run only tests whose name contains this")
    a = ap.parse_args()
    passed = failed = 0
    for t in TESTS:
        if a.k and a.k not in t.__name__:
            continue
        with tempfile.TemporaryDirectory(prefix="kite-tools-") as tmp:
            start = time.time()
            try:
                note = t(tmp)
            except Exception as e:  # report and go on with the next test
                failed += 1
                print(f"FAIL {t.__name__} ({time.time() - start:.1f}s): {type(e).__name__}: {e}")
                continue
            passed += 1
            print(f"ok   {t.__name__} ({time.time() - start:.1f}s){': ' + note if note else ''}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
