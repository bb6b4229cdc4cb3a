//! Snapshot metadata on disk: one redb database, `<root>/metadata.redb`.
//!
//! Every mutating RPC is one write transaction, so a snapshotter killed at
//! any point leaves the store as it was before or after that RPC, never in
//! between. Directories are created inside the transaction (before its
//! commit) and removed after it; a crash can therefore leave a directory
//! no record names, which `Cleanup` and the start-up sweep remove, but
//! never a record without its directory.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::Error;

/// Snapshot name -> [`Record`] as JSON.
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// Counters: `next_id`, `schema`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SCHEMA: u64 = 1;

/// The kind of a snapshot, as in containerd's API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

/// A committed snapshot that stands for a kite layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KiteLayer {
    /// The image's fsid: hex sha256 of its bootstrap.
    pub fsid: String,
    /// The reference the image was registered by (pinned when CRI gave
    /// the manifest digest).
    pub reference: String,
    /// Position among the manifest's kite layers, and their count (as
    /// the layer's labels said; for logs). Any kite layer stands for the
    /// whole image.
    pub index: u32,
    pub layers: u32,
}

/// One snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Names the snapshot's directory, `<root>/snapshots/<id>`.
    pub id: u64,
    pub kind: Kind,
    /// The parent's name, empty for none.
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
    /// Set for kite layers (which have no directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kite: Option<KiteLayer>,
    /// Committed ordinary snapshots: (bytes, inodes) of the layer,
    /// measured once at commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<(i64, i64)>,
}

/// The database.
pub struct Store {
    db: redb::Database,
}

fn internal(what: &str) -> impl Fn(redb::Error) -> Error + '_ {
    move |e| Error::Internal(format!("metadata store: {what}: {e}"))
}

/// A write transaction's view, handed to [`Store::update`]'s closure.
pub struct Tx<'t> {
    snaps: redb::Table<'t, &'static str, &'static [u8]>,
    meta: redb::Table<'t, &'static str, u64>,
}

impl<'t> Tx<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> Result<Self, Error> {
        Ok(Tx {
            snaps: txn
                .open_table(SNAPSHOTS)
                .map_err(|e| internal("open table")(e.into()))?,
            meta: txn
                .open_table(META)
                .map_err(|e| internal("open table")(e.into()))?,
        })
    }

    pub fn get(&self, name: &str) -> Result<Option<Record>, Error> {
        let v = self
            .snaps
            .get(name)
            .map_err(|e| internal("get")(e.into()))?;
        v.map(|v| decode(name, v.value())).transpose()
    }

    pub fn put(&mut self, name: &str, r: &Record) -> Result<(), Error> {
        let bytes = serde_json::to_vec(r)
            .map_err(|e| Error::Internal(format!("encoding snapshot {name}: {e}")))?;
        self.snaps
            .insert(name, bytes.as_slice())
            .map_err(|e| internal("insert")(e.into()))?;
        Ok(())
    }

    pub fn delete(&mut self, name: &str) -> Result<(), Error> {
        self.snaps
            .remove(name)
            .map_err(|e| internal("remove")(e.into()))?;
        Ok(())
    }

    /// Every snapshot, by name.
    pub fn all(&self) -> Result<Vec<(String, Record)>, Error> {
        let mut out = Vec::new();
        for item in self.snaps.iter().map_err(|e| internal("iter")(e.into()))? {
            let (k, v) = item.map_err(|e| internal("iter")(e.into()))?;
            out.push((k.value().to_string(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }

    /// Whether any snapshot has `name` as its parent.
    pub fn has_children(&self, name: &str) -> Result<bool, Error> {
        Ok(self.all()?.iter().any(|(_, r)| r.parent == name))
    }

    /// The id the next snapshot will get.
    pub fn peek_next_id(&self) -> Result<u64, Error> {
        Ok(self
            .meta
            .get("next_id")
            .map_err(|e| internal("next_id")(e.into()))?
            .map(|v| v.value())
            .unwrap_or(1))
    }

    /// A fresh snapshot id.
    pub fn next_id(&mut self) -> Result<u64, Error> {
        let id = self
            .meta
            .get("next_id")
            .map_err(|e| internal("next_id")(e.into()))?
            .map(|v| v.value())
            .unwrap_or(1);
        self.meta
            .insert("next_id", id + 1)
            .map_err(|e| internal("next_id")(e.into()))?;
        Ok(id)
    }
}

fn decode(name: &str, bytes: &[u8]) -> Result<Record, Error> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::Internal(format!("metadata store: snapshot {name}: {e}")))
}

impl Store {
    /// Open (or create) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let db = redb::Database::create(path)
            .map_err(|e| Error::Internal(format!("opening {}: {e}", path.display())))?;
        let s = Self { db };
        s.update(|tx| {
            let schema = tx
                .meta
                .get("schema")
                .map_err(|e| internal("schema")(e.into()))?
                .map(|v| v.value());
            match schema {
                None => {
                    tx.meta
                        .insert("schema", SCHEMA)
                        .map_err(|e| internal("schema")(e.into()))?;
                    Ok(())
                }
                Some(SCHEMA) => Ok(()),
                Some(other) => Err(Error::Internal(format!(
                    "{}: schema version {other}, this snapshotter reads {SCHEMA}",
                    path.display()
                ))),
            }
        })?;
        Ok(s)
    }

    /// Run `f` in one write transaction, committed if it returns `Ok`.
    pub fn update<T>(&self, f: impl FnOnce(&mut Tx<'_>) -> Result<T, Error>) -> Result<T, Error> {
        let txn = self
            .db
            .begin_write()
            .map_err(|e| internal("begin")(e.into()))?;
        let out = f(&mut Tx::open(&txn)?)?;
        txn.commit().map_err(|e| internal("commit")(e.into()))?;
        Ok(out)
    }

    /// One snapshot, read-only.
    pub fn get(&self, name: &str) -> Result<Option<Record>, Error> {
        self.read(|tx| tx.get(name))
    }

    /// Every snapshot, read-only.
    pub fn all(&self) -> Result<Vec<(String, Record)>, Error> {
        self.read(|tx| tx.all())
    }

    // Reads go through a write transaction that is dropped (aborted):
    // the store is small and RPCs are few, and one code path is simpler
    // than a second set of read-only accessors.
    fn read<T>(&self, f: impl FnOnce(&mut Tx<'_>) -> Result<T, Error>) -> Result<T, Error> {
        let txn = self
            .db
            .begin_write()
            .map_err(|e| internal("begin")(e.into()))?;
        let out = f(&mut Tx::open(&txn)?);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, parent: &str) -> Record {
        Record {
            id,
            kind: Kind::Committed,
            parent: parent.into(),
            labels: BTreeMap::new(),
            created: SystemTime::now(),
            updated: SystemTime::now(),
            kite: None,
            usage: None,
        }
    }

    #[test]
    fn records_survive_reopening_and_failed_transactions_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        {
            let s = Store::open(&path).unwrap();
            s.update(|tx| {
                let id = tx.next_id()?;
                tx.put("a", &rec(id, ""))
            })
            .unwrap();
            let r: Result<(), Error> = s.update(|tx| {
                tx.put("b", &rec(9, "a"))?;
                Err(Error::Internal("changed my mind".into()))
            });
            assert!(r.is_err());
        }
        let s = Store::open(&path).unwrap();
        let all = s.all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0, "a");
        assert_eq!(all[0].1.id, 1);
        let id = s.update(|tx| tx.next_id()).unwrap();
        assert_eq!(id, 2, "ids are never reused");
        assert!(!s.update(|tx| tx.has_children("a")).unwrap());
    }
}
