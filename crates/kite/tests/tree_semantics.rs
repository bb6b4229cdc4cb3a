//! Property test of the converter's tree semantics: random layer stacks
//! (2-5 layers of regular files, directories, symlinks, hard links, also to
//! lower layers, devices and fifos, whiteouts `.wh.NAME`, opaque markers
//! `.wh..wh..opq`, a directory replaced by a file and back, modes, owners,
//! mtimes and xattrs, stored uncompressed, gzip or zstd) are converted by
//! the real `kite convert` and applied by the independent reference
//! applier `tests/tools/refapply.py`; both must accept or both refuse, and
//! the trees must be equal field by field. kite's tree is read from the
//! converted bootstrap and blobs (`kite_convert::manifest`), so no mount
//! and no root are needed.
//!
//! 128 cases by default with a fixed seed, so a run is reproducible;
//! `PROPTEST_CASES=N` and `PROPTEST_RNG_SEED=N` explore further. A failure
//! is shrunk to a minimal stack, printed as a tar listing per layer.

mod util;

use std::fmt;
use std::path::Path;
use std::process::Command;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};
use util::ocilayout::{self, LayerCompression, TarBuilder, TarHeader};

/// Path components: three names, up to three deep, so entries collide
/// (replace, merge, whiteout each other) often.
const NAMES: [&str; 3] = ["a", "b", "c"];

#[derive(Clone)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// A file's content: `len` bytes, pseudo-random from `seed`, or zeros
/// (which kite stores as holes).
#[derive(Clone, Copy, Debug)]
struct Content {
    len: usize,
    seed: u8,
    zeros: bool,
}

impl Content {
    fn bytes(&self) -> Vec<u8> {
        if self.zeros {
            return vec![0; self.len];
        }
        let mut x = u32::from(self.seed).wrapping_mul(2_654_435_761) | 1;
        (0..self.len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 8) as u8
            })
            .collect()
    }
}

#[derive(Clone)]
enum Op {
    File(String, Content, Meta),
    /// The empty path is the root (`./`).
    Dir(String, Meta),
    Symlink(String, String, Meta),
    /// A hard link at the first path to the second (header meta ignored by
    /// both appliers, so a fixed one is written).
    Hardlink(String, String),
    Fifo(String, Meta),
    Char(String, (u32, u32), Meta),
    Block(String, (u32, u32), Meta),
    /// `.wh.NAME` for this path.
    Whiteout(String),
    /// `.wh..wh..opq` in this directory (empty: the root).
    Opaque(String),
}

#[derive(Clone, Debug)]
struct Layer {
    ops: Vec<Op>,
    compression: LayerCompression,
    /// Write names as `./a/b` instead of `a/b`.
    dot_slash: bool,
}

/// What a case runs: the layers, lowest first, and the converter options
/// that change where file data lives.
#[derive(Clone)]
struct Stack {
    layers: Vec<Layer>,
    inline_max: u64,
}

impl fmt::Debug for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04o} {}:{} mtime {}",
            self.mode, self.uid, self.gid, self.mtime
        )?;
        for (k, v) in &self.xattrs {
            write!(f, " {k}={}", hex(v))?;
        }
        Ok(())
    }
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::File(p, c, m) => write!(
                f,
                "file {p} ({} {} bytes, seed {}) {m:?}",
                if c.zeros { "zero" } else { "data" },
                c.len,
                c.seed
            ),
            Op::Dir(p, m) => write!(f, "dir {}/ {m:?}", if p.is_empty() { "." } else { p }),
            Op::Symlink(p, t, m) => write!(f, "symlink {p} -> {t} {m:?}"),
            Op::Hardlink(p, t) => write!(f, "hardlink {p} => {t}"),
            Op::Fifo(p, m) => write!(f, "fifo {p} {m:?}"),
            Op::Char(p, (ma, mi), m) => write!(f, "char {p} {ma}:{mi} {m:?}"),
            Op::Block(p, (ma, mi), m) => write!(f, "block {p} {ma}:{mi} {m:?}"),
            Op::Whiteout(p) => write!(f, "whiteout {}", with_base(p, |b| format!(".wh.{b}"))),
            Op::Opaque(d) => write!(f, "opaque {}", join(d, ".wh..wh..opq")),
        }
    }
}

impl fmt::Debug for Stack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "stack (--inline-max {}):", self.inline_max)?;
        for (i, l) in self.layers.iter().enumerate() {
            writeln!(
                f,
                "  layer {i} ({:?}{}):",
                l.compression,
                if l.dot_slash { ", ./ names" } else { "" }
            )?;
            for op in &l.ops {
                writeln!(f, "    {op:?}")?;
            }
        }
        Ok(())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// `p` with its last component mapped by `f`.
fn with_base(p: &str, f: impl Fn(&str) -> String) -> String {
    match p.rsplit_once('/') {
        Some((dir, base)) => format!("{dir}/{}", f(base)),
        None => f(p),
    }
}

fn parent(p: &str) -> &str {
    p.rsplit_once('/').map_or("", |(d, _)| d)
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

fn path(depth: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = String> {
    prop::collection::vec(0..NAMES.len(), depth)
        .prop_map(|v| v.iter().map(|&i| NAMES[i]).collect::<Vec<_>>().join("/"))
}

fn meta() -> impl Strategy<Value = Meta> {
    let ids = prop::sample::select(vec![0u32, 1, 1000, 65534, 100_000]);
    let mtimes = prop::sample::select(vec![0u64, 1, 1_700_000_000, (1 << 32) + 5]);
    let xattr = (
        prop::sample::select(vec!["user.a", "user.b", "trusted.t", "security.s"]),
        prop::collection::vec(any::<u8>(), 1..6),
    );
    (
        0u32..0o10000,
        ids.clone(),
        ids,
        mtimes,
        prop::collection::vec(xattr, 0..3),
    )
        .prop_map(|(mode, uid, gid, mtime, xs)| {
            let mut xattrs: Vec<(String, Vec<u8>)> = Vec::new();
            for (k, v) in xs {
                if !xattrs.iter().any(|(n, _)| n == k) {
                    xattrs.push((k.to_string(), v));
                }
            }
            Meta {
                mode,
                uid,
                gid,
                mtime,
                xattrs,
            }
        })
}

fn content() -> impl Strategy<Value = Content> {
    // Empty, small (inline if allowed), and over the 4 KiB chunk size (2-3
    // chunks); a few seeds so equal contents dedup across files.
    let len = prop_oneof![Just(0usize), 1usize..100, 4000usize..10_000];
    (len, 0u8..4, prop::bool::weighted(0.15)).prop_map(|(len, seed, zeros)| Content {
        len,
        seed,
        zeros,
    })
}

fn op() -> impl Strategy<Value = Op> {
    let targets = prop::sample::select(vec!["a", "b/c", "../a", "/a/b", "nowhere"]);
    let devs = prop::sample::select(vec![(0u32, 0u32), (1, 3), (8, 1), (4095, 1_048_575)]);
    prop_oneof![
        6 => (path(1..=3), content(), meta()).prop_map(|(p, c, m)| Op::File(p, c, m)),
        4 => (path(0..=3), meta()).prop_map(|(p, m)| Op::Dir(p, m)),
        2 => (path(1..=3), targets, meta()).prop_map(|(p, t, m)| Op::Symlink(p, t.into(), m)),
        3 => (path(1..=3), path(1..=3)).prop_map(|(p, t)| Op::Hardlink(p, t)),
        1 => (path(1..=3), meta()).prop_map(|(p, m)| Op::Fifo(p, m)),
        1 => (path(1..=3), devs.clone(), meta()).prop_map(|(p, d, m)| Op::Char(p, d, m)),
        1 => (path(1..=3), devs, meta()).prop_map(|(p, d, m)| Op::Block(p, d, m)),
        3 => path(1..=3).prop_map(Op::Whiteout),
        2 => path(0..=2).prop_map(Op::Opaque),
    ]
}

fn layer() -> impl Strategy<Value = Layer> {
    let compression = prop::sample::select(vec![
        LayerCompression::None,
        LayerCompression::Gzip,
        LayerCompression::Zstd,
    ]);
    (
        prop::collection::vec(op(), 1..10),
        compression,
        any::<bool>(),
    )
        .prop_map(|(ops, compression, dot_slash)| Layer {
            ops,
            compression,
            dot_slash,
        })
}

fn stack() -> impl Strategy<Value = Stack> {
    (
        prop::collection::vec(layer(), 2..=5),
        prop::sample::select(vec![0u64, 100]),
    )
        .prop_map(|(layers, inline_max)| normalise(Stack { layers, inline_max }))
}

// ---------------------------------------------------------------------------
// Keeping stacks mostly valid
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Dir,
    /// Anything that cannot be a parent (files, symlinks, devices).
    Leaf,
}

/// Drop the entries that every applier must refuse (a parent that is not a
/// directory, a hard link to nothing or to a directory), so most cases test
/// a tree rather than an error. This is a generator heuristic over path
/// shapes, not an oracle: it applies each layer's whiteouts first, as the
/// OCI spec says, and keeps every whiteout and opaque marker, so the
/// corners of their semantics still reach both appliers.
fn normalise(mut s: Stack) -> Stack {
    use std::collections::BTreeMap;
    let mut shapes: BTreeMap<String, Shape> = BTreeMap::new();
    let under = |p: &str, q: &str| q.starts_with(&format!("{p}/"));
    for layer in &mut s.layers {
        for op in &layer.ops {
            match op {
                Op::Whiteout(p) => shapes.retain(|q, _| q != p && !under(p, q)),
                Op::Opaque(d) if d.is_empty() => shapes.clear(),
                Op::Opaque(d) => shapes.retain(|q, _| !under(d, q)),
                _ => {}
            }
        }
        let mut kept = Vec::new();
        for op in layer.ops.drain(..) {
            let (p, shape) = match &op {
                Op::Whiteout(_) | Op::Opaque(_) => {
                    kept.push(op);
                    continue;
                }
                Op::Dir(p, _) => (p.clone(), Shape::Dir),
                Op::Hardlink(p, t) => {
                    if shapes.get(t) != Some(&Shape::Leaf) {
                        continue;
                    }
                    (p.clone(), Shape::Leaf)
                }
                Op::File(p, ..)
                | Op::Symlink(p, ..)
                | Op::Fifo(p, _)
                | Op::Char(p, ..)
                | Op::Block(p, ..) => (p.clone(), Shape::Leaf),
            };
            if p.is_empty() {
                kept.push(op);
                continue;
            }
            let mut a = parent(&p);
            let mut blocked = false;
            while !a.is_empty() {
                blocked |= shapes.get(a) == Some(&Shape::Leaf);
                a = parent(a);
            }
            if blocked {
                continue;
            }
            let mut a = parent(&p);
            while !a.is_empty() {
                shapes.insert(a.to_string(), Shape::Dir);
                a = parent(a);
            }
            if !(shape == Shape::Dir && shapes.get(&p) == Some(&Shape::Dir)) {
                shapes.retain(|q, _| !under(&p, q));
            }
            shapes.insert(p, shape);
            kept.push(op);
        }
        layer.ops = kept;
    }
    s
}

// ---------------------------------------------------------------------------
// Writing, converting, comparing
// ---------------------------------------------------------------------------

fn tar(layer: &Layer) -> Vec<u8> {
    let mut t = TarBuilder::default();
    let name = |p: &str| {
        if layer.dot_slash {
            format!("./{p}")
        } else {
            p.to_string()
        }
    };
    let header = |p: &str, kind: u8, m: &Meta| TarHeader {
        name: name(p),
        kind,
        mode: m.mode,
        uid: m.uid,
        gid: m.gid,
        mtime: m.mtime,
        xattrs: m.xattrs.clone(),
        ..Default::default()
    };
    let marker = |p: String| TarHeader {
        name: name(&p),
        kind: ocilayout::REGULAR,
        mode: 0o644,
        ..Default::default()
    };
    for op in &layer.ops {
        match op {
            Op::File(p, c, m) => t.entry(&header(p, ocilayout::REGULAR, m), &c.bytes()),
            Op::Dir(p, m) => {
                let mut h = header(p, ocilayout::DIR, m);
                h.name = if p.is_empty() {
                    "./".into()
                } else {
                    format!("{}/", h.name)
                };
                t.entry(&h, &[]);
            }
            Op::Symlink(p, target, m) => {
                let mut h = header(p, ocilayout::SYMLINK, m);
                h.link = target.clone();
                t.entry(&h, &[]);
            }
            Op::Hardlink(p, target) => {
                let mut h = marker(p.clone());
                h.kind = ocilayout::HARDLINK;
                h.link = name(target);
                t.entry(&h, &[]);
            }
            Op::Fifo(p, m) => t.entry(&header(p, ocilayout::FIFO, m), &[]),
            Op::Char(p, dev, m) | Op::Block(p, dev, m) => {
                let kind = if matches!(op, Op::Char(..)) {
                    ocilayout::CHAR
                } else {
                    ocilayout::BLOCK
                };
                let mut h = header(p, kind, m);
                h.dev = *dev;
                t.entry(&h, &[]);
            }
            Op::Whiteout(p) => t.entry(&marker(with_base(p, |b| format!(".wh.{b}"))), &[]),
            Op::Opaque(d) => t.entry(&marker(join(d, ".wh..wh..opq")), &[]),
        }
    }
    t.finish()
}

/// Counts of one run, printed at the end.
#[derive(Default, Debug)]
struct Tally {
    compared: u32,
    refused_by_both: u32,
    paths: u64,
    kite_time: std::time::Duration,
    reference_time: std::time::Duration,
}

/// tests/tools/refapply.py in one long-lived Python process (a child per
/// case would spend most of the test starting interpreters): it reads an
/// image reference a line and answers a JSON line, `{"manifest": ...}` as
/// `refapply.py REF` prints it, or `{"error": MESSAGE}` where refapply.py
/// would exit 2. Any other exception ends it, and the case fails.
struct Reference {
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

const REFERENCE_DRIVER: &str = r#"
import json, sys
sys.path.insert(0, sys.argv[1])
import refapply
for line in sys.stdin:
    try:
        kind, path, tag = refapply.parse_ref(line.rstrip("\n"))
        root = refapply.apply_oci(path, tag, "linux/amd64")
        out = {"manifest": refapply.manifest(root)}
    except refapply.ApplyError as e:
        out = {"error": str(e)}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
"#;

impl Reference {
    fn start() -> Reference {
        let mut child = Command::new("python3")
            .args(["-c", REFERENCE_DRIVER])
            .arg(util::repo_root().join("tests/tools"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start python3");
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        Reference { child, stdout }
    }

    /// The reference manifest of `image`, or refapply's error message.
    fn apply(&mut self, image: &str) -> Result<serde_json::Value, String> {
        use std::io::{BufRead, Write};
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{image}").expect("write to the refapply driver");
        stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the refapply driver died (see stderr)");
        let mut v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        match v.get("error") {
            Some(e) => Err(e.as_str().unwrap_or_default().to_string()),
            None => Ok(v["manifest"].take()),
        }
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Convert and apply one stack: kite's tree if both took it, `None` if
/// both refused it; Err describes a disagreement.
fn run_case(
    s: &Stack,
    reference: &mut Reference,
    tally: &mut Tally,
) -> Result<Option<serde_json::Value>, String> {
    let tmp = util::tempdir();
    let dir = tmp.path();
    let layers: Vec<(Vec<u8>, LayerCompression)> =
        s.layers.iter().map(|l| (tar(l), l.compression)).collect();
    let image = ocilayout::write_layout(&dir.join("image"), &layers);
    let out = dir.join("out");
    let inline_max = s.inline_max.to_string();
    let t0 = std::time::Instant::now();
    let kite = util::kite(&[
        "convert",
        "--quiet",
        "--threads",
        "1",
        "--chunk-size",
        "4K",
        "--inline-max",
        &inline_max,
        "--from",
        &image,
        "--to",
        out.to_str().unwrap(),
    ]);
    let t1 = std::time::Instant::now();
    let reference = reference.apply(&image);
    tally.kite_time += t1 - t0;
    tally.reference_time += t1.elapsed();
    match (kite.status.success(), reference) {
        (false, Err(_)) => {
            tally.refused_by_both += 1;
            Ok(None)
        }
        (true, Err(why)) => Err(format!(
            "kite converted an image the reference applier refuses:\n{why}"
        )),
        (false, Ok(_)) => Err(format!(
            "kite refused an image the reference applier takes:\n{}",
            String::from_utf8_lossy(&kite.stderr)
        )),
        (true, Ok(want)) => compare(dir, &out, &want, tally).map(Some),
    }
}

/// Compare kite's converted tree in `out` with the reference manifest.
fn compare(
    dir: &Path,
    out: &Path,
    want: &serde_json::Value,
    tally: &mut Tally,
) -> Result<serde_json::Value, String> {
    let bootstrap = std::fs::read(out.join("bootstrap")).expect("read the bootstrap");
    let got = kite_convert::manifest::tree_manifest(&bootstrap, out)
        .map_err(|e| format!("reading kite's tree back: {e}"))?;
    tally.compared += 1;
    tally.paths += got["entries"].as_object().map_or(0, |e| e.len() as u64);
    if &got == want {
        return Ok(got);
    }
    Err(format!(
        "kite's tree differs from the reference:\n{}",
        diff(dir, want, &got)
    ))
}

/// manifestdiff.py's lines for the reference (A) against kite (B).
fn diff(dir: &Path, want: &serde_json::Value, got: &serde_json::Value) -> String {
    let want_path = dir.join("reference.json");
    let got_path = dir.join("kite.json");
    std::fs::write(&want_path, serde_json::to_vec_pretty(want).unwrap()).unwrap();
    std::fs::write(&got_path, serde_json::to_vec_pretty(got).unwrap()).unwrap();
    let out = Command::new("python3")
        .arg(util::tool("manifestdiff.py"))
        .args([&want_path, &got_path])
        .output()
        .expect("run manifestdiff.py");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn converted_tree_matches_reference_applier() {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 128;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = RngSeed::Fixed(18);
    }
    if std::env::var_os("PROPTEST_MAX_SHRINK_ITERS").is_none() {
        config.max_shrink_iters = 400;
    }
    // A failure becomes a named regression test instead.
    config.failure_persistence = None;
    let mut runner = TestRunner::new(config);
    let tally = std::cell::RefCell::new(Tally::default());
    let reference = std::cell::RefCell::new(Reference::start());
    // The runner's final value may be a passing neighbour of the minimal
    // failure; keep the last failing stack ourselves.
    let last_failing = std::cell::RefCell::new(None);
    let started = std::time::Instant::now();
    let result = runner.run(&stack(), |s| {
        match run_case(&s, &mut reference.borrow_mut(), &mut tally.borrow_mut()) {
            Ok(_) => Ok(()),
            Err(why) => {
                *last_failing.borrow_mut() = Some(s);
                Err(TestCaseError::fail(why))
            }
        }
    });
    let tally = tally.into_inner();
    // Shrinking runs count too.
    eprintln!(
        "tree_semantics: {} runs compared trees ({} paths), {} refused by both, in {:.1?} \
         (kite convert {:.1?}, refapply.py {:.1?})",
        tally.compared,
        tally.paths,
        tally.refused_by_both,
        started.elapsed(),
        tally.kite_time,
        tally.reference_time
    );
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, _)) => {
            let s = last_failing.into_inner().expect("a failing stack");
            panic!("minimal failing {s:?}{why}")
        }
        Err(e) => panic!("{e}"),
    }
}

// ---------------------------------------------------------------------------
// Regression tests: what the property test found, each a fixed stack that
// both appliers must agree on, with the outcome the OCI spec asks for.
// ---------------------------------------------------------------------------

fn m(mode: u32) -> Meta {
    Meta {
        mode,
        uid: 0,
        gid: 0,
        mtime: 1_700_000_000,
        xattrs: Vec::new(),
    }
}

fn file(p: &str, seed: u8) -> Op {
    Op::File(
        p.into(),
        Content {
            len: 10,
            seed,
            zeros: false,
        },
        m(0o644),
    )
}

fn dir(p: &str) -> Op {
    Op::Dir(p.into(), m(0o755))
}

/// kite's tree of the layers (lowest first), checked against the
/// reference; `None` if both refuse the image.
fn agreed(layers: Vec<Vec<Op>>) -> Option<serde_json::Value> {
    let s = Stack {
        layers: layers
            .into_iter()
            .map(|ops| Layer {
                ops,
                compression: LayerCompression::None,
                dot_slash: false,
            })
            .collect(),
        inline_max: 0,
    };
    run_case(&s, &mut Reference::start(), &mut Tally::default())
        .unwrap_or_else(|why| panic!("{s:?}{why}"))
}

fn paths(tree: &serde_json::Value) -> Vec<&str> {
    tree["entries"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect()
}

/// The OCI spec's own example: the opaque marker comes after the layer's
/// new `a/b/c/foo`, and still hides only the lower `a/b/c/bar`. (kite
/// applied markers in tar order, so `a/b/` merged over the lower one kept
/// `bar`.)
#[test]
fn opaque_marker_after_its_layers_entries_hides_only_lower_ones() {
    let lower = vec![dir("a"), dir("a/b"), dir("a/b/c"), file("a/b/c/bar", 1)];
    let upper = vec![
        dir("a"),
        dir("a/b"),
        dir("a/b/c"),
        file("a/b/c/foo", 2),
        Op::Opaque("a".into()),
    ];
    let tree = agreed(vec![lower, upper]).expect("a valid image");
    assert_eq!(paths(&tree), ["/", "/a", "/a/b", "/a/b/c", "/a/b/c/foo"]);
}

/// `d/x` then `.wh.d` in one layer: the whiteout deletes the lower `d`,
/// not the layer's own `d/x`. (kite deleted both.)
#[test]
fn whiteout_after_its_layers_entry_below_it_keeps_the_entry() {
    let lower = vec![dir("d"), file("d/old", 1)];
    let upper = vec![file("d/x", 2), Op::Whiteout("d".into())];
    let tree = agreed(vec![lower, upper]).expect("a valid image");
    assert_eq!(paths(&tree), ["/", "/d", "/d/x"]);
    // `d` is now the implicit parent of `d/x`, not the lower directory.
    assert_eq!(tree["entries"]["/d"]["mtime"], 0);
}

/// `a/.wh.x` where the lower `a` is a file: nothing to delete. (kite
/// refused the layer: "parent a is not a directory".)
#[test]
fn whiteout_under_a_lower_file_hides_nothing() {
    let tree =
        agreed(vec![vec![file("a", 1)], vec![Op::Whiteout("a/x".into())]]).expect("a valid image");
    assert_eq!(paths(&tree), ["/", "/a"]);
}

/// A file replaced by a directory whose opaque marker comes first: the
/// marker finds a file below and hides nothing. (kite refused the layer.)
#[test]
fn opaque_marker_over_a_lower_file_hides_nothing() {
    let tree = agreed(vec![
        vec![file("a", 1)],
        vec![Op::Opaque("a".into()), dir("a"), file("a/y", 2)],
    ])
    .expect("a valid image");
    assert_eq!(paths(&tree), ["/", "/a", "/a/y"]);
}

/// An opaque marker in a directory that exists nowhere creates nothing.
/// (kite created an empty `d`.)
#[test]
fn opaque_marker_in_a_missing_directory_creates_nothing() {
    let tree =
        agreed(vec![vec![file("x", 1)], vec![Op::Opaque("d".into())]]).expect("a valid image");
    assert_eq!(paths(&tree), ["/", "/x"]);
}

/// A hard link to a file its own layer whites out: the whiteout applies
/// first, so the target does not exist. (kite linked to the lower file.)
#[test]
fn hardlink_to_a_file_its_layer_whites_out_is_refused() {
    let upper = vec![
        Op::Hardlink("b".into(), "a".into()),
        Op::Whiteout("a".into()),
    ];
    assert_eq!(agreed(vec![vec![file("a", 1)], upper]), None);
}

/// A layer's markers are resolved against what the lower layers left, in
/// any order: `a/.wh.x` goes through the lower symlink `a` even when the
/// same layer's `.wh.a` (before or after it) deletes `a`. (kite, and the
/// reference applier, took the layer in one order and refused it in the
/// other.)
#[test]
fn markers_resolve_against_the_lower_layers_in_any_order() {
    let lower = || vec![Op::Symlink("a".into(), "b".into(), m(0o777)), dir("b")];
    let deletes_a = Op::Whiteout("a".into());
    let through_a = Op::Whiteout("a/x".into());
    for upper in [
        vec![deletes_a.clone(), through_a.clone()],
        vec![through_a, deletes_a],
    ] {
        assert_eq!(agreed(vec![lower(), upper]), None);
    }
}

/// A hard link to a lower layer's file shares its inode, metadata and
/// content.
#[test]
fn hardlink_to_a_lower_layers_file_shares_its_inode() {
    let tree = agreed(vec![
        vec![file("a", 1)],
        vec![Op::Hardlink("c/b".into(), "a".into())],
    ])
    .expect("a valid image");
    assert_eq!(tree["entries"]["/c/b"]["link_group"], "/a");
    assert_eq!(tree["entries"]["/a"]["link_group"], "/a");
}
