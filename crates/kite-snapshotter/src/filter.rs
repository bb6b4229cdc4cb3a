//! List filters in containerd's filter syntax, for the fields a snapshot
//! has: `kind`, `name`, `parent` and `labels.<key>`.
//!
//! A request's filters are alternatives (a snapshot matches if any filter
//! does); a filter is selectors joined by `,`, all of which must hold. A
//! selector is a field path, optionally followed by `==` or `!=` and a
//! value; a path alone asks that the field be present and non-empty.
//! Path components and values may be double-quoted (containerd quotes
//! label keys that contain dots: `labels."containerd.io/snapshot.ref"`).
//! Regular-expression selectors (`~=`) are refused as invalid arguments:
//! containerd's own callers do not send them to snapshotters.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// Parsed filters: empty matches everything.
#[derive(Debug, Clone, Default)]
pub struct Filters(Vec<Vec<Selector>>);

/// The fields of a snapshot a filter can see.
pub struct Fields<'a> {
    pub kind: &'a str,
    pub name: &'a str,
    pub parent: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

impl Filters {
    pub fn parse(filters: &[String]) -> Result<Self, String> {
        let mut out = Vec::new();
        for f in filters {
            if f.trim().is_empty() {
                continue;
            }
            out.push(parse_one(f).map_err(|e| format!("filter {f:?}: {e}"))?);
        }
        Ok(Self(out))
    }

    pub fn matches(&self, s: &Fields<'_>) -> bool {
        self.0.is_empty() || self.0.iter().any(|sels| sels.iter().all(|x| x.holds(s)))
    }
}

impl Selector {
    fn holds(&self, s: &Fields<'_>) -> bool {
        let value: Option<&str> = match self.path.as_slice() {
            [f] if f == "kind" => Some(s.kind),
            [f] if f == "name" => Some(s.name),
            [f] if f == "parent" => Some(s.parent),
            [f, rest @ ..] if f == "labels" && !rest.is_empty() => {
                s.labels.get(&rest.join(".")).map(String::as_str)
            }
            _ => None,
        };
        match &self.op {
            Op::Present => value.is_some_and(|v| !v.is_empty()),
            Op::Eq(want) => value == Some(want.as_str()),
            Op::Ne(want) => value != Some(want.as_str()),
        }
    }
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c == b' ' || c == b'\t') {
            self.i += 1;
        }
    }

    /// A quoted string (with `\"` and `\\` escapes) or a bare word ending
    /// at one of `stops`.
    fn word(&mut self, stops: &[u8]) -> Result<String, String> {
        self.skip_ws();
        if self.peek() == Some(b'"') {
            self.i += 1;
            let mut out = Vec::new();
            loop {
                match self.peek() {
                    None => return Err("unterminated quote".into()),
                    Some(b'"') => {
                        self.i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        self.i += 1;
                        let c = self.peek().ok_or("unterminated quote")?;
                        out.push(c);
                        self.i += 1;
                    }
                    Some(c) => {
                        out.push(c);
                        self.i += 1;
                    }
                }
            }
            return String::from_utf8(out).map_err(|_| "not UTF-8".into());
        }
        let start = self.i;
        while self.peek().is_some_and(|c| !stops.contains(&c)) {
            self.i += 1;
        }
        let w = std::str::from_utf8(&self.s[start..self.i])
            .map_err(|_| "not UTF-8".to_string())?
            .trim_end();
        Ok(w.to_string())
    }
}

fn parse_one(f: &str) -> Result<Vec<Selector>, String> {
    let mut lx = Lexer {
        s: f.as_bytes(),
        i: 0,
    };
    let mut sels = Vec::new();
    loop {
        let mut path = Vec::new();
        loop {
            let w = lx.word(b".,=!~ \t")?;
            if w.is_empty() {
                return Err(format!("empty field name at byte {}", lx.i));
            }
            path.push(w);
            lx.skip_ws();
            if lx.peek() == Some(b'.') {
                lx.i += 1;
            } else {
                break;
            }
        }
        lx.skip_ws();
        let rest = &lx.s[lx.i..];
        let op = if rest.starts_with(b"==") || rest.starts_with(b"!=") {
            let eq = rest[0] == b'=';
            lx.i += 2;
            let v = lx.word(b",")?;
            if eq {
                Op::Eq(v)
            } else {
                Op::Ne(v)
            }
        } else if rest.starts_with(b"~=") {
            return Err("regular-expression selectors (~=) are not supported".into());
        } else {
            Op::Present
        };
        sels.push(Selector { path, op });
        lx.skip_ws();
        match lx.peek() {
            None => return Ok(sels),
            Some(b',') => lx.i += 1,
            Some(c) => return Err(format!("unexpected {:?} at byte {}", c as char, lx.i)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(labels: &'a BTreeMap<String, String>, parent: &'a str) -> Fields<'a> {
        Fields {
            kind: "Committed",
            name: "sha256:abc",
            parent,
            labels,
        }
    }

    #[test]
    fn containerds_walk_filter_for_an_existing_layer() {
        // What containerd's metadata layer sends after AlreadyExists.
        let f = Filters::parse(&[
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="k8s.io/3/sha256:p""#.into(),
        ])
        .unwrap();
        let mut labels = BTreeMap::new();
        labels.insert(
            "containerd.io/snapshot.ref".to_string(),
            "sha256:abc".to_string(),
        );
        assert!(f.matches(&fields(&labels, "k8s.io/3/sha256:p")));
        assert!(!f.matches(&fields(&labels, "other")));
        labels.insert(
            "containerd.io/snapshot.ref".to_string(),
            "sha256:x".to_string(),
        );
        assert!(!f.matches(&fields(&labels, "k8s.io/3/sha256:p")));
    }

    #[test]
    fn alternatives_presence_and_inequality() {
        let labels = BTreeMap::from([("a".to_string(), "1".to_string())]);
        let f = Filters::parse(&["kind==View".into(), "labels.a".into()]).unwrap();
        assert!(f.matches(&fields(&labels, "")));
        let f = Filters::parse(&["labels.b".into()]).unwrap();
        assert!(!f.matches(&fields(&labels, "")));
        let f = Filters::parse(&["kind!=Active, name==sha256:abc".into()]).unwrap();
        assert!(f.matches(&fields(&labels, "")));
        assert!(Filters::parse(&[]).unwrap().matches(&fields(&labels, "")));
    }

    #[test]
    fn malformed_filters_are_refused() {
        for bad in ["name~=x", "==x", r#"labels."open"#, "name==a,,"] {
            assert!(Filters::parse(&[bad.into()]).is_err(), "{bad}");
        }
    }
}
