#!/usr/bin/env python3
"""Compare two tree manifests (from refapply.py or treemanifest.py).

This file owns the comparison: every path missing from B or extra in B, and
every differing field of a path present in both, one line each (at most
``--max-lines``, then a count), then a one-line summary. Exit 0 if equal,
1 if not, 2 on bad input.

    manifestdiff.py A.json B.json [--ignore FIELD]... [--ignore-dir-mtime]
                    [--max-lines 50]

FIELD is a manifest field (mtime, xattrs, link_group, ...) or
``xattr:NAME`` for one xattr.
"""

from __future__ import annotations

import argparse
import json
import sys


def _fmt(field: str, v) -> str:
    if field == "mode" and isinstance(v, int):
        return oct(v)
    s = json.dumps(v)
    return s if len(s) <= 80 else s[:77] + "..."


def diff(a: dict, b: dict, ignore=(), ignore_dir_mtime=False) -> list[tuple[str, str]]:
    """[(kind, line)] where kind is missing, extra or changed."""
    out = []
    ea, eb = a["entries"], b["entries"]
    ignore = set(ignore)
    for path in sorted(ea.keys() | eb.keys()):
        if path not in eb:
            out.append(("missing", f"- {path}: only in A ({ea[path].get('type')})"))
            continue
        if path not in ea:
            out.append(("extra", f"+ {path}: only in B ({eb[path].get('type')})"))
            continue
        x, y = ea[path], eb[path]
        for field in sorted(x.keys() | y.keys()):
            if field in ignore or (field == "mtime" and ignore_dir_mtime and x.get("type") == "dir"):
                continue
            if field == "xattrs":
                xa, xb = x.get(field) or {}, y.get(field) or {}
                for name in sorted(xa.keys() | xb.keys()):
                    if "xattr:" + name in ignore or xa.get(name) == xb.get(name):
                        continue
                    out.append(("changed", f"~ {path}: xattr {name}: {_fmt('x', xa.get(name))}"
                                           f" != {_fmt('x', xb.get(name))}"))
            elif x.get(field) != y.get(field):
                out.append(("changed", f"~ {path}: {field}: {_fmt(field, x.get(field))}"
                                       f" != {_fmt(field, y.get(field))}"))
    return out


def _load(path: str) -> dict:
    with open(path) as f:
        m = json.load(f)
    if not isinstance(m, dict) or not isinstance(m.get("entries"), dict):
        raise ValueError(f"{path}: not a manifest (no 'entries' object)")
    return m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Compare two tree manifests.")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--ignore", action="append", default=[], metavar="FIELD")
    ap.add_argument("--ignore-dir-mtime", action="store_true")
    ap.add_argument("--max-lines", type=int, default=50)
    args = ap.parse_args(argv)
    try:
        a, b = _load(args.a), _load(args.b)
    except (OSError, ValueError) as e:
        print(f"manifestdiff: error: {e}", file=sys.stderr)
        return 2
    d = diff(a, b, args.ignore, args.ignore_dir_mtime)
    for _, line in d[:args.max_lines]:
        print(line)
    if len(d) > args.max_lines:
        print(f"... and {len(d) - args.max_lines} more differences")
    counts = {k: sum(1 for kind, _ in d if kind == k) for k in ("missing", "extra", "changed")}
    head = f"manifestdiff: A={args.a} ({len(a['entries'])} paths) B={args.b} ({len(b['entries'])} paths):"
    if d:
        print(f"{head} {len(d)} differences ({counts['missing']} only in A,"
              f" {counts['extra']} only in B, {counts['changed']} field differences)")
        return 1
    print(f"{head} identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
