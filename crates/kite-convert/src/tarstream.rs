//! A streaming tar reader for image layers.
//!
//! Written here rather than taken from a crate because a converter must get
//! every byte right and say exactly what is wrong: PAX records are split by
//! their length prefix (values may hold any byte, newlines included, as
//! binary xattrs do), GNU long names and links, base-256 numbers, old GNU
//! sparse files (sparse maps in the header and extension blocks) and PAX 1.0
//! sparse files are understood, and a stream that ends early, a bad header
//! checksum or a record that overruns its header are errors, never guesses.
//!
//! The reader never seeks: it suits a decompressor's output.

use std::io::{self, Read};

const BLOCK: usize = 512;

/// Entry type flags we act on.
pub mod kind {
    pub const REGULAR: u8 = b'0';
    pub const REGULAR_OLD: u8 = 0;
    pub const LINK: u8 = b'1';
    pub const SYMLINK: u8 = b'2';
    pub const CHAR: u8 = b'3';
    pub const BLOCK: u8 = b'4';
    pub const DIR: u8 = b'5';
    pub const FIFO: u8 = b'6';
    pub const CONTIGUOUS: u8 = b'7';
    pub const PAX_LOCAL: u8 = b'x';
    pub const PAX_GLOBAL: u8 = b'g';
    pub const GNU_LONGNAME: u8 = b'L';
    pub const GNU_LONGLINK: u8 = b'K';
    pub const GNU_SPARSE: u8 = b'S';
}

/// One tar entry's metadata, with all extension headers applied.
#[derive(Debug, Clone, Default)]
pub struct TarEntry {
    pub path: Vec<u8>,
    pub link: Vec<u8>,
    /// Type flag (see [`kind`]); GNU sparse entries report REGULAR.
    pub kind: u8,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub mtime_nsec: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Logical file size (the real size of sparse files).
    pub size: u64,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// For sparse files: data segments (offset, length) in file order.
    pub sparse: Option<Vec<(u64, u64)>>,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Parse a numeric header field: octal text, or GNU base-256.
fn number(field: &[u8], what: &str) -> io::Result<u64> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        if field[0] == 0xff {
            return Err(bad(format!("negative {what}")));
        }
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for &b in &field[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(b as u64))
                .ok_or_else(|| bad(format!("{what} overflows")))?;
        }
        return Ok(v);
    }
    let text: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != 0 && b != b' ')
        .collect();
    if text.is_empty() {
        return Ok(0);
    }
    let s = std::str::from_utf8(&text).map_err(|_| bad(format!("{what} is not octal")))?;
    u64::from_str_radix(s, 8).map_err(|_| bad(format!("{what} {s:?} is not octal")))
}

fn cstr(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// Split PAX extended header data into (key, value) records by their length
/// prefixes.
pub fn pax_records(mut data: &[u8]) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.iter().all(|&b| b == 0) {
            break; // trailing NUL padding written by some tools
        }
        let sp = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| bad("PAX record without a length"))?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("PAX record length is not a number"))?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(bad("PAX record length does not match its content"));
        }
        let rec = &data[sp + 1..len - 1];
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad("PAX record without '='"))?;
        out.push((rec[..eq].to_vec(), rec[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(out)
}

fn pax_num(v: &[u8], key: &str) -> io::Result<u64> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            bad(format!(
                "PAX {key} {:?} is not a number",
                String::from_utf8_lossy(v)
            ))
        })
}

/// `secs[.frac]` -> (secs, nsec); negative times clamp to 0.
pub fn pax_time(v: &[u8]) -> io::Result<(u64, u32)> {
    let s = std::str::from_utf8(v).map_err(|_| bad("PAX mtime is not text"))?;
    if s.starts_with('-') {
        return Ok((0, 0));
    }
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: u64 = secs.parse().map_err(|_| bad(format!("PAX mtime {s:?}")))?;
    if !frac.bytes().all(|c| c.is_ascii_digit()) {
        return Err(bad(format!("PAX mtime {s:?}")));
    }
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    Ok((secs, digits.parse().map_err(|_| bad("PAX mtime fraction"))?))
}

/// Reads entries from a tar stream.
pub struct TarReader<R> {
    inner: R,
    /// Stored data bytes of the current entry not yet consumed.
    remaining: u64,
    /// Padding after the current entry's data.
    padding: u64,
    /// Logical reading state of the current entry.
    cur: Option<Cursor>,
    global: Vec<(Vec<u8>, Vec<u8>)>,
    done: bool,
    /// Bytes consumed from the stream.
    pub position: u64,
}

struct Cursor {
    /// Logical position in the file.
    pos: u64,
    size: u64,
    segments: Option<Vec<(u64, u64)>>,
    seg: usize,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            remaining: 0,
            padding: 0,
            cur: None,
            global: Vec::new(),
            done: false,
            position: 0,
        }
    }

    /// Give back the underlying reader (to drain what follows the archive).
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn read_exact_counted(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tar stream ends in the middle of an entry (truncated)",
                )
            } else {
                e
            }
        })?;
        self.position += buf.len() as u64;
        Ok(())
    }

    fn skip(&mut self, mut n: u64) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let k = n.min(buf.len() as u64) as usize;
            self.read_exact_counted(&mut buf[..k])?;
            n -= k as u64;
        }
        Ok(())
    }

    /// Read a block; `Ok(false)` on a clean EOF before any byte.
    fn read_block(&mut self, buf: &mut [u8; BLOCK]) -> io::Result<bool> {
        let mut got = 0;
        while got < BLOCK {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tar header truncated",
                    ))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.position += BLOCK as u64;
        Ok(true)
    }

    fn read_data_whole(&mut self, size: u64, what: &str) -> io::Result<Vec<u8>> {
        if size > 16 << 20 {
            return Err(bad(format!("{what} of {size} bytes is too large")));
        }
        let mut v = vec![0u8; size as usize];
        self.read_exact_counted(&mut v)?;
        self.skip(pad(size))?;
        Ok(v)
    }

    /// The next entry, after skipping what is left of the current one.
    /// `Ok(None)` at the end-of-archive block.
    pub fn next_entry(&mut self) -> io::Result<Option<TarEntry>> {
        if self.done {
            return Ok(None);
        }
        let rest = self.remaining + self.padding;
        self.skip(rest)?;
        self.remaining = 0;
        self.padding = 0;
        self.cur = None;

        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut block = [0u8; BLOCK];
        loop {
            if !self.read_block(&mut block)? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tar stream ends without its end-of-archive block (truncated)",
                ));
            }
            if block.iter().all(|&b| b == 0) {
                self.done = true;
                return Ok(None);
            }
            verify_checksum(&block)?;
            let typeflag = block[156];
            let size = number(&block[124..136], "size")?;
            match typeflag {
                kind::GNU_LONGNAME => {
                    let mut v = self.read_data_whole(size, "GNU long name")?;
                    v.truncate(cstr(&v).len());
                    long_name = Some(v);
                }
                kind::GNU_LONGLINK => {
                    let mut v = self.read_data_whole(size, "GNU long link")?;
                    v.truncate(cstr(&v).len());
                    long_link = Some(v);
                }
                kind::PAX_LOCAL => {
                    let v = self.read_data_whole(size, "PAX header")?;
                    pax.extend(pax_records(&v)?);
                }
                kind::PAX_GLOBAL => {
                    let v = self.read_data_whole(size, "PAX global header")?;
                    self.global.extend(pax_records(&v)?);
                }
                _ => {
                    return self
                        .finish_entry(&block, size, long_name, long_link, pax)
                        .map(Some)
                }
            }
        }
    }

    fn finish_entry(
        &mut self,
        h: &[u8; BLOCK],
        header_size: u64,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
        pax: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> io::Result<TarEntry> {
        let magic = &h[257..263];
        let ustar = magic == b"ustar\0";
        let gnu = &h[257..265] == b"ustar  \0";
        let mut path = cstr(&h[0..100]).to_vec();
        if ustar {
            let prefix = cstr(&h[345..500]);
            if !prefix.is_empty() {
                let mut p = prefix.to_vec();
                p.push(b'/');
                p.extend_from_slice(&path);
                path = p;
            }
        }
        let mut e = TarEntry {
            path,
            link: cstr(&h[157..257]).to_vec(),
            kind: h[156],
            mode: number(&h[100..108], "mode")? as u32,
            uid: number(&h[108..116], "uid")?,
            gid: number(&h[116..124], "gid")?,
            mtime: number(&h[136..148], "mtime")?,
            ..Default::default()
        };
        if matches!(e.kind, kind::CHAR | kind::BLOCK) {
            e.dev_major = number(&h[329..337], "device major")? as u32;
            e.dev_minor = number(&h[337..345], "device minor")? as u32;
        }
        if let Some(n) = long_name {
            e.path = n;
        }
        if let Some(l) = long_link {
            e.link = l;
        }
        let mut stored = header_size;
        let mut sparse: Option<Vec<(u64, u64)>> = None;
        let mut real_size: Option<u64> = None;
        let mut pax_sparse_major: Option<u64> = None;
        let mut pax_sparse_name: Option<Vec<u8>> = None;
        for (k, v) in self.global.iter().chain(pax.iter()) {
            match k.as_slice() {
                b"path" => e.path = v.clone(),
                b"linkpath" => e.link = v.clone(),
                b"size" => stored = pax_num(v, "size")?,
                b"uid" => e.uid = pax_num(v, "uid")?,
                b"gid" => e.gid = pax_num(v, "gid")?,
                b"mtime" => (e.mtime, e.mtime_nsec) = pax_time(v)?,
                b"GNU.sparse.major" => pax_sparse_major = Some(pax_num(v, "GNU.sparse.major")?),
                b"GNU.sparse.name" => pax_sparse_name = Some(v.clone()),
                b"GNU.sparse.realsize" | b"GNU.sparse.size" => {
                    real_size = Some(pax_num(v, "GNU.sparse.realsize")?)
                }
                b"GNU.sparse.map" | b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => {
                    return Err(bad(
                        "PAX sparse format 0.x is not supported (use GNU or PAX 1.0 sparse)",
                    ))
                }
                _ => {
                    if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                        e.xattrs.retain(|(n, _)| n != name);
                        e.xattrs.push((name.to_vec(), v.clone()));
                    }
                }
            }
        }
        self.remaining = stored;
        self.padding = pad(stored);
        e.size = stored;
        if e.kind == kind::GNU_SPARSE {
            if !gnu {
                return Err(bad("GNU sparse entry without a GNU header"));
            }
            let mut map = Vec::new();
            parse_sparse_entries(&h[386..482], &mut map)?;
            let mut extended = h[482] != 0;
            while extended {
                let mut ext = [0u8; BLOCK];
                if !self.read_block(&mut ext)? {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "sparse map truncated",
                    ));
                }
                parse_sparse_entries(&ext[..504], &mut map)?;
                extended = ext[504] != 0;
            }
            let real = number(&h[483..495], "sparse real size")?;
            sparse = Some(map);
            real_size = Some(real);
            e.kind = kind::REGULAR;
        } else if let Some(1) = pax_sparse_major {
            // PAX 1.0: the data starts with a text map padded to a block.
            if let Some(n) = pax_sparse_name.take() {
                e.path = n;
            }
            let map = self.read_pax1_map()?;
            sparse = Some(map);
            if real_size.is_none() {
                return Err(bad("PAX sparse file without GNU.sparse.realsize"));
            }
        } else if pax_sparse_major.is_some() {
            return Err(bad("unsupported PAX sparse version"));
        }
        if let Some(map) = &sparse {
            let real = real_size.unwrap_or(0);
            let mut end = 0u64;
            let mut total = 0u64;
            for &(off, len) in map {
                if off < end || off.checked_add(len).is_none_or(|x| x > real) {
                    return Err(bad("sparse map out of order or beyond the file size"));
                }
                end = off + len;
                total += len;
            }
            if total != self.remaining {
                return Err(bad(format!(
                    "sparse map covers {total} bytes but the entry stores {}",
                    self.remaining
                )));
            }
            e.size = real;
        }
        e.sparse = sparse.clone();
        self.cur = Some(Cursor {
            pos: 0,
            size: e.size,
            segments: sparse,
            seg: 0,
        });
        Ok(e)
    }

    fn read_pax1_map(&mut self) -> io::Result<Vec<(u64, u64)>> {
        // Decimal numbers, one per line: count, then offset/size pairs.
        let mut text = Vec::new();
        let mut nums = Vec::new();
        let mut want: Option<u64> = None;
        let mut consumed = 0u64;
        loop {
            let mut blk = [0u8; BLOCK];
            if self.remaining < BLOCK as u64 {
                return Err(bad("PAX sparse map overruns the entry"));
            }
            self.read_exact_counted(&mut blk)?;
            self.remaining -= BLOCK as u64;
            consumed += BLOCK as u64;
            text.extend_from_slice(&blk);
            while let Some(nl) = text.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = text.drain(..=nl).collect();
                let n = pax_num(&line[..line.len() - 1], "sparse map")?;
                if want.is_none() {
                    if n > 1 << 20 {
                        return Err(bad("PAX sparse map too large"));
                    }
                    want = Some(n * 2);
                } else {
                    nums.push(n);
                }
                if want == Some(nums.len() as u64) {
                    let _ = consumed;
                    return Ok(nums.chunks(2).map(|p| (p[0], p[1])).collect());
                }
            }
            if consumed > 64 << 20 {
                return Err(bad("PAX sparse map too large"));
            }
        }
    }
}

fn parse_sparse_entries(area: &[u8], map: &mut Vec<(u64, u64)>) -> io::Result<()> {
    for ent in area.chunks_exact(24) {
        if ent.iter().all(|&b| b == 0) {
            continue;
        }
        let off = number(&ent[..12], "sparse offset")?;
        let len = number(&ent[12..], "sparse length")?;
        map.push((off, len));
    }
    Ok(())
}

fn pad(n: u64) -> u64 {
    (BLOCK as u64 - n % BLOCK as u64) % BLOCK as u64
}

fn verify_checksum(h: &[u8; BLOCK]) -> io::Result<()> {
    let stored = number(&h[148..156], "checksum")?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += b as u64;
        signed += (b as i8) as i64;
    }
    if stored != unsigned && stored as i64 != signed {
        return Err(bad(format!(
            "tar header checksum mismatch (stored {stored}, computed {unsigned}): not a tar stream or corrupt"
        )));
    }
    Ok(())
}

impl<R: Read> Read for TarReader<R> {
    /// Read the current entry's logical content (holes of sparse files read
    /// as zeros). Returns 0 at the entry's end.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(cur) = self.cur.as_mut() else {
            return Ok(0);
        };
        if cur.pos >= cur.size || buf.is_empty() {
            return Ok(0);
        }
        let left = cur.size - cur.pos;
        // Where does stored data come next?
        let (data_at, data_len) = match &cur.segments {
            None => (0, cur.size),
            Some(segs) => {
                while cur.seg < segs.len() && segs[cur.seg].0 + segs[cur.seg].1 <= cur.pos {
                    cur.seg += 1;
                }
                segs.get(cur.seg).copied().unwrap_or((cur.size, 0))
            }
        };
        if cur.pos < data_at {
            let n = (data_at - cur.pos).min(left).min(buf.len() as u64) as usize;
            buf[..n].fill(0);
            cur.pos += n as u64;
            return Ok(n);
        }
        let in_seg = data_at + data_len - cur.pos;
        let n = in_seg.min(buf.len() as u64) as usize;
        let got = self.inner.read(&mut buf[..n])?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "tar stream ends in the middle of an entry's data (truncated)",
            ));
        }
        self.position += got as u64;
        self.remaining -= got as u64;
        if let Some(cur) = self.cur.as_mut() {
            cur.pos += got as u64;
        }
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, typeflag: u8, size: u64) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        let s = format!("{size:011o}");
        h[124..135].copy_from_slice(s.as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = typeflag;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        h
    }

    fn with_data(mut out: Vec<u8>, data: &[u8]) -> Vec<u8> {
        out.extend_from_slice(data);
        out.resize(out.len() + pad(data.len() as u64) as usize, 0);
        out
    }

    #[test]
    fn pax_binary_values_with_newlines() {
        let value: Vec<u8> = (0..=255u8).collect();
        let mut rec = Vec::new();
        let body_len = " SCHILY.xattr.user.bin=".len() + value.len() + 1;
        // The length prefix counts itself.
        let mut len = body_len + 3;
        if len.to_string().len() != 3 {
            len = body_len + len.to_string().len();
        }
        rec.extend_from_slice(format!("{len} SCHILY.xattr.user.bin=").as_bytes());
        rec.extend_from_slice(&value);
        rec.push(b'\n');
        assert_eq!(rec.len(), len);
        rec.extend_from_slice(b"12 path=abc\n");
        let recs = pax_records(&rec).unwrap();
        assert_eq!(recs[0].0, b"SCHILY.xattr.user.bin");
        assert_eq!(recs[0].1, value);
        assert_eq!(recs[1], (b"path".to_vec(), b"abc".to_vec()));

        let mut tar = with_data(header("PaxHeader", b'x', rec.len() as u64).to_vec(), &rec);
        tar = with_data([tar, header("short", b'0', 5).to_vec()].concat(), b"hello");
        tar.extend_from_slice(&[0u8; 1024]);
        let mut r = TarReader::new(&tar[..]);
        let e = r.next_entry().unwrap().unwrap();
        assert_eq!(e.path, b"abc");
        assert_eq!(e.xattrs[0].1, value);
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        assert!(r.next_entry().unwrap().is_none());
    }

    #[test]
    fn malformed_pax_is_an_error() {
        assert!(pax_records(b"99 path=x\n").is_err());
        assert!(pax_records(b"x path=x\n").is_err());
        assert!(pax_records(b"10 pathx\n\n").is_err());
    }

    #[test]
    fn truncation_and_missing_end_block_are_errors() {
        let full = with_data(header("f", b'0', 600).to_vec(), &[1u8; 600]);
        // Cut inside the data.
        let mut r = TarReader::new(&full[..700]);
        r.next_entry().unwrap().unwrap();
        let mut v = Vec::new();
        assert_eq!(
            r.read_to_end(&mut v).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        // Complete entry but no end-of-archive block.
        let mut r = TarReader::new(&full[..]);
        r.next_entry().unwrap().unwrap();
        let err = r.next_entry().unwrap_err();
        assert!(err.to_string().contains("end-of-archive"), "{err}");
    }

    #[test]
    fn checksum_and_numbers() {
        let mut h = header("f", b'0', 0);
        h[0] = b'g';
        let mut data = h.to_vec();
        data.extend_from_slice(&[0u8; 1024]);
        assert!(TarReader::new(&data[..])
            .next_entry()
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        // GNU base-256 number.
        let mut f = [0u8; 8];
        f[0] = 0x80;
        f[5..8].copy_from_slice(&[0x01, 0x86, 0xa0]);
        assert_eq!(number(&f, "uid").unwrap(), 100_000);
        assert_eq!(number(b"0000755 ", "mode").unwrap(), 0o755);
    }

    #[test]
    fn gnu_sparse_reads_holes_as_zeros() {
        let mut h = header("sp", b'S', 8);
        h[257..265].copy_from_slice(b"ustar  \0");
        // segments: (4, 4) and (20, 4); real size 30
        h[386..398].copy_from_slice(b"00000000004\0");
        h[398..410].copy_from_slice(b"00000000004\0");
        h[410..422].copy_from_slice(b"00000000024\0");
        h[422..434].copy_from_slice(b"00000000004\0");
        h[483..495].copy_from_slice(b"00000000036\0");
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        let mut tar = with_data(h.to_vec(), b"AAAABBBB");
        tar.extend_from_slice(&[0u8; 1024]);
        let mut r = TarReader::new(&tar[..]);
        let e = r.next_entry().unwrap().unwrap();
        assert_eq!(e.size, 30);
        assert_eq!(e.kind, kind::REGULAR);
        let mut v = Vec::new();
        r.read_to_end(&mut v).unwrap();
        let mut want = vec![0u8; 30];
        want[4..8].copy_from_slice(b"AAAA");
        want[20..24].copy_from_slice(b"BBBB");
        assert_eq!(v, want);
        assert!(r.next_entry().unwrap().is_none());
    }
}
