//! The merged view of an image's layers, built entry by entry.
//!
//! Layers are applied in order with OCI semantics: an entry replaces what
//! was at its path (a directory over a directory only updates metadata and
//! keeps the children), `.wh.NAME` deletes NAME from lower layers, and
//! `.wh..wh..opq` clears a directory's lower-layer children. As the spec
//! says, a layer's markers apply before its other entries, whatever their
//! order in the tar: the layer applier hands the tree all markers of a
//! layer at once ([`MergedTree::hide`]), then the entries. Every directory
//! entry also remembers the layer that last wrote it, so a marker never
//! hides an entry of its own layer. Paths are resolved inside the tree only
//! (nothing touches the host filesystem); an entry that would be written
//! through a symlink is refused.

use std::collections::{BTreeMap, HashMap};

use kite_erofs::{FileData, Metadata, Node, NodeId, NodeKind, Tree};

/// Why an entry cannot be applied; the caller adds layer and entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeError(pub String);

#[derive(Debug, Clone)]
pub(crate) enum Kind {
    Dir(BTreeMap<Vec<u8>, Child>),
    Other(NodeKind),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Child {
    id: NodeId,
    layer: u32,
}

#[derive(Debug, Clone)]
struct TNode {
    meta: Metadata,
    kind: Kind,
}

/// The tree under construction. Node 0 is the root.
pub struct MergedTree {
    nodes: Vec<TNode>,
}

impl Default for MergedTree {
    fn default() -> Self {
        Self::new()
    }
}

/// A validated path: components with no `.`/`..`/empty parts.
pub type Components = Vec<Vec<u8>>;

/// What a whiteout marker hides (see [`MergedTree::hide`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hide {
    /// `.wh.NAME`: the entry at this path.
    Entry(Components),
    /// `.wh..wh..opq`: every child of this directory.
    Children(Components),
}

/// Normalise a tar path into components. Rejects absolute paths, `..`,
/// NUL bytes and over-long names; strips `./` and trailing slashes. The empty
/// result means the root itself.
pub fn split_path(raw: &[u8]) -> Result<Components, TreeError> {
    if raw.first() == Some(&b'/') {
        return Err(TreeError("absolute path".into()));
    }
    if raw.contains(&0) {
        return Err(TreeError("path contains a NUL byte".into()));
    }
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => continue,
            b".." => return Err(TreeError("path contains `..`".into())),
            _ if c.len() > kite_erofs::ondisk::NAME_LEN_MAX => {
                return Err(TreeError(format!(
                    "name component of {} bytes exceeds 255",
                    c.len()
                )))
            }
            _ => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

fn default_dir_meta() -> Metadata {
    Metadata {
        perm: 0o755,
        ..Default::default()
    }
}

impl MergedTree {
    pub fn new() -> Self {
        Self {
            nodes: vec![TNode {
                meta: default_dir_meta(),
                kind: Kind::Dir(BTreeMap::new()),
            }],
        }
    }

    fn children_mut(&mut self, id: NodeId) -> &mut BTreeMap<Vec<u8>, Child> {
        match &mut self.nodes[id].kind {
            Kind::Dir(c) => c,
            Kind::Other(_) => unreachable!("caller checked node {id} is a directory"),
        }
    }

    /// Walk to the directory holding `comps`' last component. Missing
    /// directories are created (as tar extractors do) when `create` is set.
    fn parent_dir(
        &mut self,
        comps: &[Vec<u8>],
        layer: u32,
        create: bool,
    ) -> Result<Option<NodeId>, TreeError> {
        let mut cur = 0;
        for (depth, name) in comps[..comps.len().saturating_sub(1)].iter().enumerate() {
            let existing = match &self.nodes[cur].kind {
                Kind::Dir(c) => c.get(name).copied(),
                Kind::Other(_) => unreachable!(),
            };
            cur = match existing {
                Some(child) => match &self.nodes[child.id].kind {
                    Kind::Dir(_) => child.id,
                    Kind::Other(NodeKind::Symlink(_)) => {
                        return Err(TreeError(format!(
                            "parent {:?} is a symlink: refusing to write through it",
                            show(&comps[..=depth])
                        )))
                    }
                    Kind::Other(_) => {
                        return Err(TreeError(format!(
                            "parent {:?} is not a directory",
                            show(&comps[..=depth])
                        )))
                    }
                },
                None if create => {
                    let id = self.push(default_dir_meta(), Kind::Dir(BTreeMap::new()));
                    self.children_mut(cur)
                        .insert(name.clone(), Child { id, layer });
                    id
                }
                None => return Ok(None),
            };
        }
        Ok(Some(cur))
    }

    fn push(&mut self, meta: Metadata, kind: Kind) -> NodeId {
        self.nodes.push(TNode { meta, kind });
        self.nodes.len() - 1
    }

    /// Add or replace the entry at `comps`.
    pub fn insert(
        &mut self,
        comps: &[Vec<u8>],
        meta: Metadata,
        kind: NodeKind,
        layer: u32,
    ) -> Result<(), TreeError> {
        let Some(name) = comps.last() else {
            // The root entry itself (`./`): only a directory can be the root.
            return match kind {
                NodeKind::Dir(_) => {
                    self.nodes[0].meta = meta;
                    Ok(())
                }
                _ => Err(TreeError("root entry is not a directory".into())),
            };
        };
        let parent = self
            .parent_dir(comps, layer, true)?
            .expect("parents are created");
        let is_dir = matches!(kind, NodeKind::Dir(_));
        let existing = self.children_mut(parent).get(name).copied();
        if let (true, Some(child)) = (is_dir, existing) {
            if let Kind::Dir(_) = self.nodes[child.id].kind {
                // Directory over directory: merge, keep children.
                self.nodes[child.id].meta = meta;
                self.children_mut(parent).insert(
                    name.clone(),
                    Child {
                        id: child.id,
                        layer,
                    },
                );
                return Ok(());
            }
        }
        let k = if is_dir {
            Kind::Dir(BTreeMap::new())
        } else {
            Kind::Other(kind)
        };
        let id = self.push(meta, k);
        self.children_mut(parent)
            .insert(name.clone(), Child { id, layer });
        Ok(())
    }

    /// Look up an existing entry without creating anything.
    fn lookup(&mut self, comps: &[Vec<u8>]) -> Result<Option<NodeId>, TreeError> {
        let Some(name) = comps.last() else {
            return Ok(Some(0));
        };
        let Some(parent) = self.parent_dir(comps, 0, false)? else {
            return Ok(None);
        };
        Ok(self.children_mut(parent).get(name).map(|c| c.id))
    }

    /// A hardlink at `comps` to the existing non-directory at `target`.
    pub fn hardlink(
        &mut self,
        comps: &[Vec<u8>],
        target: &[Vec<u8>],
        layer: u32,
    ) -> Result<(), TreeError> {
        let id = self.lookup(target)?.ok_or_else(|| {
            TreeError(format!("hardlink target {:?} does not exist", show(target)))
        })?;
        if let Kind::Dir(_) = self.nodes[id].kind {
            return Err(TreeError(format!(
                "hardlink target {:?} is a directory",
                show(target)
            )));
        }
        let Some(name) = comps.last() else {
            return Err(TreeError("hardlink at the root".into()));
        };
        let parent = self
            .parent_dir(comps, layer, true)?
            .expect("parents are created");
        self.children_mut(parent)
            .insert(name.clone(), Child { id, layer });
        Ok(())
    }

    /// The directory at `comps` if there is one, for a whiteout marker.
    /// Nothing is created; a missing path or a non-directory is `None`, but
    /// a path through a symlink is refused, as for every other entry.
    fn existing_dir(&self, comps: &[Vec<u8>]) -> Result<Option<NodeId>, TreeError> {
        let mut cur = 0;
        for (depth, name) in comps.iter().enumerate() {
            let Kind::Dir(children) = &self.nodes[cur].kind else {
                return Ok(None);
            };
            let Some(child) = children.get(name) else {
                return Ok(None);
            };
            if let Kind::Other(NodeKind::Symlink(_)) = self.nodes[child.id].kind {
                return Err(TreeError(format!(
                    "{:?} is a symlink: refusing a whiteout through it",
                    show(&comps[..=depth])
                )));
            }
            cur = child.id;
        }
        Ok(matches!(self.nodes[cur].kind, Kind::Dir(_)).then_some(cur))
    }

    /// Apply one layer's whiteouts and opaque markers. Every marker is
    /// resolved against the tree as it is on entry (what the lower layers
    /// left) before any is applied, so their order in the tar does not
    /// matter: a marker whose directory is missing or not a directory
    /// hides nothing, and one whose directory path goes through a symlink
    /// is refused (`Err` has its index) even if another marker of the
    /// layer hides that symlink. Only entries of layers below `layer` are
    /// hidden. Markers create nothing: a layer that re-creates what it
    /// hides does so with its own entries, applied after this.
    pub fn hide(&mut self, markers: &[Hide], layer: u32) -> Result<(), (usize, TreeError)> {
        let mut resolved = Vec::with_capacity(markers.len());
        for (i, m) in markers.iter().enumerate() {
            let dir = match m {
                Hide::Entry(comps) => match comps.split_last() {
                    Some((_, parent)) => parent,
                    None => return Err((i, TreeError("whiteout of the root".into()))),
                },
                Hide::Children(dir) => &dir[..],
            };
            if let Some(id) = self.existing_dir(dir).map_err(|e| (i, e))? {
                resolved.push((id, m));
            }
        }
        for (id, m) in resolved {
            let children = self.children_mut(id);
            match m {
                Hide::Entry(comps) => {
                    let name = comps.last().expect("checked above");
                    if children.get(name).is_some_and(|c| c.layer < layer) {
                        children.remove(name);
                    }
                }
                Hide::Children(_) => children.retain(|_, c| c.layer >= layer),
            }
        }
        Ok(())
    }

    /// `.wh.NAME` alone: [`MergedTree::hide`] of one entry.
    pub fn whiteout(&mut self, comps: &[Vec<u8>], layer: u32) -> Result<(), TreeError> {
        self.hide(&[Hide::Entry(comps.to_vec())], layer)
            .map_err(|(_, e)| e)
    }

    /// `.wh..wh..opq` in `dir` alone: [`MergedTree::hide`] of its children.
    pub fn opaque(&mut self, dir: &[Vec<u8>], layer: u32) -> Result<(), TreeError> {
        self.hide(&[Hide::Children(dir.to_vec())], layer)
            .map_err(|(_, e)| e)
    }

    /// Turn the reachable part of the tree into the EROFS writer's form.
    /// Nodes replaced or deleted by upper layers are dropped here.
    pub fn into_erofs_tree(self) -> Tree {
        let mut map: HashMap<NodeId, NodeId> = HashMap::new();
        let mut out = Tree::default();
        let mut nodes: Vec<Option<TNode>> = self.nodes.into_iter().map(Some).collect();
        // Iterative DFS assigning new ids on first sight.
        let mut stack = vec![0usize];
        map.insert(0, 0);
        out.nodes.push(placeholder());
        while let Some(old) = stack.pop() {
            let new = map[&old];
            let t = nodes[old].take().expect("each node is taken once");
            let kind = match t.kind {
                Kind::Dir(children) => {
                    let mut entries = Vec::with_capacity(children.len());
                    for (name, child) in children {
                        let id = *map.entry(child.id).or_insert_with(|| {
                            out.nodes.push(placeholder());
                            stack.push(child.id);
                            out.nodes.len() - 1
                        });
                        entries.push((name, id));
                    }
                    NodeKind::Dir(entries)
                }
                Kind::Other(k) => k,
            };
            out.nodes[new] = Node { meta: t.meta, kind };
        }
        out
    }
}

fn placeholder() -> Node {
    Node {
        meta: Metadata::default(),
        kind: NodeKind::Fifo,
    }
}

fn show(comps: &[Vec<u8>]) -> String {
    let v: Vec<String> = comps
        .iter()
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    v.join("/")
}

/// Convenience used by tests and the directory source.
pub fn file(data: FileData) -> NodeKind {
    NodeKind::File(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Components {
        split_path(s.as_bytes()).unwrap()
    }
    fn m() -> Metadata {
        Metadata {
            perm: 0o644,
            ..Default::default()
        }
    }
    fn f(tag: u8) -> NodeKind {
        NodeKind::File(FileData::Inline(vec![tag]))
    }
    fn dir() -> NodeKind {
        NodeKind::Dir(vec![])
    }

    /// Flatten to sorted "path=content" lines for assertions.
    fn list(t: MergedTree) -> Vec<String> {
        let tree = t.into_erofs_tree();
        let mut out = Vec::new();
        let mut stack = vec![(String::new(), 0usize)];
        while let Some((path, id)) = stack.pop() {
            match &tree.nodes[id].kind {
                NodeKind::Dir(es) => {
                    out.push(format!("{path}/"));
                    for (n, c) in es {
                        stack.push((format!("{path}/{}", String::from_utf8_lossy(n)), *c));
                    }
                }
                NodeKind::File(FileData::Inline(d)) => out.push(format!("{path}={}", d[0])),
                NodeKind::Symlink(t) => out.push(format!("{path}->{}", String::from_utf8_lossy(t))),
                _ => out.push(format!("{path}?")),
            }
        }
        out.sort();
        out
    }

    #[test]
    fn path_validation() {
        assert_eq!(p("./a//b/"), vec![b"a".to_vec(), b"b".to_vec()]);
        assert!(p("./").is_empty());
        assert!(split_path(b"/etc/passwd").is_err());
        assert!(split_path(b"a/../../x").is_err());
        assert!(split_path(&[b'x'; 256]).is_err());
        assert!(split_path(&[b'x'; 255]).is_ok());
    }

    #[test]
    fn whiteouts_apply_to_lower_layers_only() {
        let mut t = MergedTree::new();
        t.insert(&p("a"), m(), f(1), 0).unwrap();
        t.insert(&p("d/x"), m(), f(2), 0).unwrap();
        t.insert(&p("b"), m(), f(3), 1).unwrap();
        t.whiteout(&p("a"), 1).unwrap();
        t.whiteout(&p("b"), 1).unwrap(); // same layer: kept
        t.whiteout(&p("d"), 1).unwrap(); // whole directory
        t.whiteout(&p("nope/zzz"), 1).unwrap(); // missing: no-op
        assert_eq!(list(t), vec!["/", "/b=3"]);
    }

    #[test]
    fn opaque_keeps_same_layer_entries_in_either_order() {
        let mut t = MergedTree::new();
        t.insert(&p("d/old"), m(), f(1), 0).unwrap();
        t.insert(&p("d/sub/deep"), m(), f(2), 0).unwrap();
        t.insert(&p("d"), m(), dir(), 1).unwrap();
        t.insert(&p("d/before"), m(), f(3), 1).unwrap();
        t.opaque(&p("d"), 1).unwrap();
        t.insert(&p("d/after"), m(), f(4), 1).unwrap();
        assert_eq!(list(t), vec!["/", "/d/", "/d/after=4", "/d/before=3"]);
    }

    #[test]
    fn replace_and_recreate() {
        let mut t = MergedTree::new();
        t.insert(&p("x/y"), m(), f(1), 0).unwrap();
        t.insert(&p("x"), m(), f(9), 1).unwrap(); // file replaces a dir
        t.whiteout(&p("f"), 1).unwrap();
        t.insert(&p("f"), m(), f(2), 0).unwrap();
        t.whiteout(&p("f"), 2).unwrap();
        t.insert(&p("f"), m(), f(5), 3).unwrap(); // deleted then re-created
        assert_eq!(list(t), vec!["/", "/f=5", "/x=9"]);
    }

    #[test]
    fn hardlinks_and_symlink_parents() {
        let mut t = MergedTree::new();
        t.insert(&p("a"), m(), f(1), 0).unwrap();
        t.hardlink(&p("dir/b"), &p("a"), 1).unwrap();
        assert!(t
            .hardlink(&p("c"), &p("missing"), 1)
            .unwrap_err()
            .0
            .contains("does not exist"));
        t.insert(&p("l"), m(), NodeKind::Symlink(b"/etc".to_vec()), 1)
            .unwrap();
        let e = t.insert(&p("l/passwd"), m(), f(1), 1).unwrap_err();
        assert!(e.0.contains("symlink"), "{e:?}");
        let tree = t.into_erofs_tree();
        // `a` and `dir/b` share one node.
        let root = match &tree.nodes[0].kind {
            NodeKind::Dir(e) => e.clone(),
            _ => unreachable!(),
        };
        let a = root.iter().find(|(n, _)| n == b"a").unwrap().1;
        let dir = root.iter().find(|(n, _)| n == b"dir").unwrap().1;
        let NodeKind::Dir(de) = &tree.nodes[dir].kind else {
            unreachable!()
        };
        assert_eq!(de[0].1, a);
    }
}
