//! fanotify pre-content events (Linux >= 6.14): the successor to
//! cachefiles on-demand for file-backed EROFS.
//!
//! A group of class `FAN_CLASS_PRE_CONTENT` marks sparse blob files with
//! `FAN_PRE_ACCESS`; a read of a missing range blocks in the kernel until
//! the daemon fills the range through the event's fd (writes through that fd
//! raise no event) and answers allow, or denies with an errno. Parsing event
//! records and encoding responses are pure functions here; the group,
//! marks and fds are at the edge. Every [`PermEvent`] is answered exactly
//! once: dropping it unanswered denies it with EIO, so no reader can hang.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::cachefiles::{CacheObject, WriteFuture};
use crate::uring::{AlignedBuf, Writer};
use crate::KernelError;

pub const FAN_CLASS_PRE_CONTENT: u32 = 0x08;
pub const FAN_CLOEXEC: u32 = 0x01;
pub const FAN_NONBLOCK: u32 = 0x02;
/// Pre-content access (value seen working on 6.18, kernel-notes section 4).
pub const FAN_PRE_ACCESS: u64 = 0x0010_0000;
pub const FAN_MARK_ADD: u32 = 0x01;
pub const FAN_MARK_REMOVE: u32 = 0x02;
pub const FAN_ALLOW: u32 = 0x01;
pub const FAN_DENY: u32 = 0x02;
pub const FAN_NOFD: i32 = -1;
pub const METADATA_VERSION: u8 = 3;
pub const METADATA_LEN: usize = 24;
pub const INFO_TYPE_RANGE: u8 = 6;
const RANGE_INFO_LEN: usize = 24;

/// `FAN_DENY_ERRNO(err)`: deny with a specific errno (6.14+).
pub fn deny_errno(errno: i32) -> u32 {
    FAN_DENY | (((errno as u32) & 0xff) << 24)
}

/// One event record as read (the fd is still a number here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    pub mask: u64,
    pub fd: i32,
    pub pid: i32,
    /// `(offset, count)` from a range info record.
    pub range: Option<(u64, u64)>,
}

/// Why event data could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("fanotify event metadata version {0}, expected 3")]
    Version(u8),
    #[error("fanotify event record malformed: {0}")]
    Malformed(&'static str),
}

/// Decode every event in one `read()` result.
pub fn parse_events(mut buf: &[u8]) -> Result<Vec<RawEvent>, EventError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        if buf.len() < METADATA_LEN {
            return Err(EventError::Malformed("short metadata"));
        }
        let event_len = u32::from_ne_bytes(buf[0..4].try_into().expect("4")) as usize;
        let vers = buf[4];
        let metadata_len = u16::from_ne_bytes(buf[6..8].try_into().expect("2")) as usize;
        if vers != METADATA_VERSION {
            return Err(EventError::Version(vers));
        }
        if event_len < METADATA_LEN
            || event_len > buf.len()
            || metadata_len < METADATA_LEN
            || metadata_len > event_len
        {
            return Err(EventError::Malformed("lengths out of range"));
        }
        let mask = u64::from_ne_bytes(buf[8..16].try_into().expect("8"));
        let fd = i32::from_ne_bytes(buf[16..20].try_into().expect("4"));
        let pid = i32::from_ne_bytes(buf[20..24].try_into().expect("4"));
        let mut range = None;
        let mut info = &buf[metadata_len..event_len];
        while !info.is_empty() {
            if info.len() < 4 {
                return Err(EventError::Malformed("short info header"));
            }
            let ty = info[0];
            let len = u16::from_ne_bytes(info[2..4].try_into().expect("2")) as usize;
            if len < 4 || len > info.len() {
                return Err(EventError::Malformed("info record length"));
            }
            if ty == INFO_TYPE_RANGE {
                if len != RANGE_INFO_LEN {
                    return Err(EventError::Malformed("range info length"));
                }
                let off = u64::from_ne_bytes(info[8..16].try_into().expect("8"));
                let count = u64::from_ne_bytes(info[16..24].try_into().expect("8"));
                range = Some((off, count));
            }
            info = &info[len..];
        }
        out.push(RawEvent {
            mask,
            fd,
            pid,
            range,
        });
        buf = &buf[event_len..];
    }
    Ok(out)
}

/// The fds of whatever event records can still be walked in a buffer that
/// failed to parse.
pub fn salvage_fds(mut buf: &[u8]) -> Vec<i32> {
    let mut fds = Vec::new();
    while buf.len() >= METADATA_LEN {
        let event_len = u32::from_ne_bytes(buf[0..4].try_into().expect("4")) as usize;
        let fd = i32::from_ne_bytes(buf[16..20].try_into().expect("4"));
        if fd >= 0 {
            fds.push(fd);
        }
        if event_len < METADATA_LEN || event_len > buf.len() {
            break;
        }
        buf = &buf[event_len..];
    }
    fds
}

/// `struct fanotify_response { s32 fd; u32 response; }`.
pub fn encode_response(fd: i32, response: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&fd.to_ne_bytes());
    b[4..].copy_from_slice(&response.to_ne_bytes());
    b
}

/// Settle the permission events a dead process had read but not answered:
/// deny (EIO) every pending event whose fd number is below `below`.
///
/// A response names its event by the fd number the event got when it was
/// read, matched against the group's events awaiting an answer; the writer
/// need not own that fd, and the events of a reader that died stay pending
/// while the group lives (kernel-notes/fanotify.md). Their ranges are
/// unknown, so they cannot be filled: EIO is the only correct answer.
///
/// Call this only while no live process reads from the group: a live
/// reader's pending events have fd numbers too, and would be denied (or,
/// worse, a dead reader's event could be allowed by a live reader's
/// answer for the same number). `below` must bound the dead reader's fd
/// numbers: its RLIMIT_NOFILE. Returns how many events were denied.
pub fn deny_pending(group: BorrowedFd<'_>, below: i32) -> usize {
    let mut denied = 0;
    for fd in 0..below.max(0) {
        // ENOENT: no (more) pending events with this number. Two dead
        // readers may have used the same number; each answer takes the
        // oldest, so repeat until the kernel says there is none.
        while nix::unistd::write(group, &encode_response(fd, deny_errno(libc::EIO))).is_ok() {
            denied += 1;
        }
    }
    denied
}

/// A future returned by [`PreContent::next_events`].
pub type EventsFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<Vec<Box<dyn PreContentEvent>>, KernelError>> + Send,
    >,
>;

/// A pre-content group as the daemon uses it: the real [`Group`], or a
/// scripted double in tests (as [`crate::cachefiles::CacheDevice`] is for
/// cachefiles).
pub trait PreContent: Send + Sync {
    /// Wait for events and return all that are pending.
    fn next_events(self: Arc<Self>) -> EventsFuture;
    /// Watch `path` for pre-content access.
    fn mark(&self, path: &Path) -> Result<(), KernelError>;
    /// Stop watching `path`.
    fn unmark(&self, path: &Path) -> Result<(), KernelError>;
}

/// One permission event awaiting its answer. Dropping it unanswered must
/// deny it (EIO), so no reader waits forever.
pub trait PreContentEvent: Send {
    /// `(offset, count)` of the access, if the kernel said.
    fn range(&self) -> Option<(u64, u64)>;
    /// The accessing process.
    fn pid(&self) -> i32;
    /// `(device, inode)` of the event's file.
    fn file_id(&self) -> io::Result<(u64, u64)>;
    /// A cache object writing into the event's file without raising
    /// events.
    fn object(&self, writer: &Arc<Writer>) -> Arc<dyn CacheObject>;
    /// Allow, or deny with `errno`.
    fn answer(self: Box<Self>, result: Result<(), i32>);
}

/// A pre-content notification group.
pub struct Group {
    file: AsyncFd<std::fs::File>,
}

impl Group {
    /// Create a pre-content group and return its fd (the holder keeps it;
    /// workers serve it through [`Group::from_fd`]). Event fds are opened
    /// read-write so the daemon can fill ranges through them.
    pub fn create_fd() -> Result<OwnedFd, KernelError> {
        // SAFETY: fanotify_init takes two integer flag words and returns a
        // new fd or -1; no pointers are involved.
        let fd = unsafe {
            libc::fanotify_init(
                FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK,
                (libc::O_RDWR | libc::O_LARGEFILE | libc::O_CLOEXEC) as u32,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(KernelError::Io {
                what: "fanotify_init(FAN_CLASS_PRE_CONTENT) (needs Linux >= 6.14 with CONFIG_FANOTIFY_ACCESS_PERMISSIONS)".into(),
                source: e,
            });
        }
        // SAFETY: fd was just returned by fanotify_init and is owned by
        // nothing else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Create a group and serve it in this process. Must run inside a
    /// tokio runtime.
    pub fn new() -> Result<Arc<Self>, KernelError> {
        Self::from_fd(Self::create_fd()?)
    }

    /// Serve a group created elsewhere (the holder's, inherited or passed
    /// over a socket). Its open file description is shared with the other
    /// copies, so it is switched to non-blocking for all of them, which is
    /// what every kite process expects. Must run inside a tokio runtime.
    pub fn from_fd(fd: OwnedFd) -> Result<Arc<Self>, KernelError> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let io_err = |what: &str, e: nix::errno::Errno| KernelError::Io {
            what: what.into(),
            source: e.into(),
        };
        let fl = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)
            .map_err(|e| io_err("fcntl(F_GETFL) on the fanotify group", e))?;
        fcntl(
            fd.as_raw_fd(),
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK),
        )
        .map_err(|e| io_err("fcntl(F_SETFL, O_NONBLOCK) on the fanotify group", e))?;
        let file = std::fs::File::from(fd);
        // SAFETY: the AsyncFd owns the File, so the fd stays open while it is
        // registered with the reactor and is deregistered before closing.
        let file =
            unsafe { AsyncFd::register_with_interest(file, Interest::READABLE) }.map_err(|e| {
                KernelError::Io {
                    what: "registering the fanotify group with the reactor".into(),
                    source: e.into(),
                }
            })?;
        Ok(Arc::new(Self { file }))
    }

    /// The group's fd (to hand a copy to another process).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.get_ref().as_fd()
    }

    /// Probe whether this kernel supports pre-content groups.
    pub fn supported() -> bool {
        // SAFETY: as in `new`; the probe fd is closed right away.
        let fd = unsafe {
            libc::fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC, libc::O_RDONLY as u32)
        };
        if fd < 0 {
            return false;
        }
        // SAFETY: fd is ours and closed exactly once here.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        true
    }

    fn mark_op(&self, flags: u32, path: &Path) -> Result<(), KernelError> {
        let c =
            std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| KernelError::Io {
                what: format!("fanotify mark {}", path.display()),
                source: io::Error::from(io::ErrorKind::InvalidInput),
            })?;
        // SAFETY: the group fd is valid for the life of self, `c` is a
        // NUL-terminated path that outlives the call, and the mask is a
        // plain integer.
        let r = unsafe {
            libc::fanotify_mark(
                self.file.as_raw_fd(),
                flags,
                FAN_PRE_ACCESS,
                libc::AT_FDCWD,
                c.as_ptr(),
            )
        };
        if r < 0 {
            return Err(KernelError::Io {
                what: format!(
                    "fanotify_mark({}, FAN_PRE_ACCESS) on {}",
                    if flags == FAN_MARK_ADD {
                        "add"
                    } else {
                        "remove"
                    },
                    path.display()
                ),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Watch `path` for pre-content access.
    pub fn mark(&self, path: &Path) -> Result<(), KernelError> {
        self.mark_op(FAN_MARK_ADD, path)
    }

    /// Stop watching `path` (e.g. once the blob is complete on disk).
    pub fn unmark(&self, path: &Path) -> Result<(), KernelError> {
        self.mark_op(FAN_MARK_REMOVE, path)
    }

    /// Wait for events and return all that are pending. Each event's fd is
    /// owned from here on.
    pub async fn next_events(self: &Arc<Self>) -> Result<Vec<PermEvent>, KernelError> {
        loop {
            let mut guard = self.file.readable().await.map_err(|e| KernelError::Io {
                what: "polling the fanotify group".into(),
                source: e,
            })?;
            let mut buf = vec![0u8; 64 * 1024];
            let n = match self.file.get_ref().read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(KernelError::Io {
                        what: "reading fanotify events".into(),
                        source: e,
                    })
                }
            };
            let raw = &buf[..n];
            let events = match parse_events(raw) {
                Ok(ev) => ev,
                Err(e) => {
                    // Deny every fd we can still find, so no reader waits
                    // on an event nobody will answer, then report.
                    for fd in salvage_fds(raw) {
                        // SAFETY: the kernel installed this fd for an event
                        // in this buffer; it is wrapped exactly once, here.
                        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                        let _ = self.respond(owned.as_raw_fd(), deny_errno(libc::EIO));
                    }
                    return Err(KernelError::Io {
                        what: format!("decoding fanotify events (their reads were denied): {e}"),
                        source: io::Error::from(io::ErrorKind::InvalidData),
                    });
                }
            };
            return Ok(events
                .into_iter()
                .filter(|e| e.fd >= 0)
                .map(|e| PermEvent {
                    // SAFETY: the kernel installed this fd in our table for
                    // this event; it is wrapped exactly once, here.
                    fd: Arc::new(unsafe { OwnedFd::from_raw_fd(e.fd as RawFd) }),
                    raw: e,
                    group: Arc::clone(self),
                    answered: false,
                })
                .collect());
        }
    }

    fn respond(&self, fd: i32, response: u32) -> io::Result<()> {
        self.file
            .get_ref()
            .write_all(&encode_response(fd, response))
    }
}

impl PreContent for Group {
    fn next_events(self: Arc<Self>) -> EventsFuture {
        Box::pin(async move {
            Ok(Group::next_events(&self)
                .await?
                .into_iter()
                .map(|e| Box::new(e) as Box<dyn PreContentEvent>)
                .collect())
        })
    }
    fn mark(&self, path: &Path) -> Result<(), KernelError> {
        Group::mark(self, path)
    }
    fn unmark(&self, path: &Path) -> Result<(), KernelError> {
        Group::unmark(self, path)
    }
}

impl PreContentEvent for PermEvent {
    fn range(&self) -> Option<(u64, u64)> {
        self.raw.range
    }
    fn pid(&self) -> i32 {
        self.raw.pid
    }
    fn file_id(&self) -> io::Result<(u64, u64)> {
        PermEvent::file_id(self)
    }
    fn object(&self, writer: &Arc<Writer>) -> Arc<dyn CacheObject> {
        PermEvent::object(self, writer)
    }
    fn answer(self: Box<Self>, result: Result<(), i32>) {
        let _ = PermEvent::answer(*self, result);
    }
}

/// A permission event awaiting an answer.
pub struct PermEvent {
    pub raw: RawEvent,
    fd: Arc<OwnedFd>,
    group: Arc<Group>,
    answered: bool,
}

impl PermEvent {
    /// The file the event is about, opened read-write for filling.
    pub fn file(&self) -> &Arc<OwnedFd> {
        &self.fd
    }

    /// `(device, inode)` of the event's file.
    pub fn file_id(&self) -> io::Result<(u64, u64)> {
        let st = nix::sys::stat::fstat(self.fd.as_raw_fd()).map_err(io::Error::from)?;
        Ok((st.st_dev, st.st_ino))
    }

    /// Answer: allow, or deny with `errno`.
    pub fn answer(mut self, result: Result<(), i32>) -> io::Result<()> {
        self.answered = true;
        let resp = match result {
            Ok(()) => FAN_ALLOW,
            Err(errno) => deny_errno(errno),
        };
        self.group.respond(self.fd.as_raw_fd(), resp)
    }

    /// A cache object writing into this event's file.
    pub fn object(&self, writer: &Arc<Writer>) -> Arc<dyn CacheObject> {
        // Every event fd of one file writes the same file: its inode is the
        // target.
        let target = self
            .file_id()
            .map(|(dev, ino)| dev.rotate_left(32) ^ ino)
            .unwrap_or(0);
        Arc::new(EventFile {
            fd: Arc::clone(&self.fd),
            writer: Arc::clone(writer),
            target,
        })
    }
}

impl Drop for PermEvent {
    fn drop(&mut self) {
        if !self.answered {
            // Never leave a reader blocked: deny with EIO.
            let _ = self
                .group
                .respond(self.fd.as_raw_fd(), deny_errno(libc::EIO));
        }
    }
}

/// Writes into a marked file through an event's fd (raising no events).
struct EventFile {
    fd: Arc<OwnedFd>,
    writer: Arc<Writer>,
    target: u64,
}

impl AsFd for EventFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl CacheObject for EventFile {
    fn write_at(&self, off: u64, buf: AlignedBuf) -> WriteFuture {
        let rx = self.writer.submit(Arc::clone(&self.fd), off, buf);
        Box::pin(async move {
            rx.await
                .map_err(|_| io::Error::other("io_uring writer stopped"))?
        })
    }
    fn complete_read(&self, _msg_id: u32) -> io::Result<()> {
        // The fanotify answer is sent by the event itself.
        Ok(())
    }
    fn target(&self) -> u64 {
        self.target
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(mask: u64, fd: i32, range: Option<(u64, u64)>) -> Vec<u8> {
        let mut b = Vec::new();
        let len = METADATA_LEN + if range.is_some() { RANGE_INFO_LEN } else { 0 };
        b.extend_from_slice(&(len as u32).to_ne_bytes());
        b.push(METADATA_VERSION);
        b.push(0);
        b.extend_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
        b.extend_from_slice(&mask.to_ne_bytes());
        b.extend_from_slice(&fd.to_ne_bytes());
        b.extend_from_slice(&77i32.to_ne_bytes());
        if let Some((o, c)) = range {
            b.push(INFO_TYPE_RANGE);
            b.push(0);
            b.extend_from_slice(&(RANGE_INFO_LEN as u16).to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(&o.to_ne_bytes());
            b.extend_from_slice(&c.to_ne_bytes());
        }
        b
    }

    #[test]
    fn parses_several_events_with_ranges() {
        let mut buf = event(FAN_PRE_ACCESS, 5, Some((4096, 131072)));
        buf.extend(event(FAN_PRE_ACCESS, 6, None));
        let ev = parse_events(&buf).unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].range, Some((4096, 131072)));
        assert_eq!(ev[0].fd, 5);
        assert_eq!(ev[1].range, None);
        assert_eq!(ev[1].pid, 77);
    }

    #[test]
    fn malformed_records_are_refused() {
        let buf = event(FAN_PRE_ACCESS, 5, Some((0, 1)));
        assert!(parse_events(&buf[..30]).is_err());
        let mut bad = buf.clone();
        bad[4] = 2;
        assert_eq!(parse_events(&bad), Err(EventError::Version(2)));
        let mut bad = buf.clone();
        bad[METADATA_LEN + 2] = 200; // info record longer than the event
        assert!(parse_events(&bad).is_err());
    }

    #[test]
    fn responses_encode_errno() {
        assert_eq!(deny_errno(5), 0x0500_0002);
        let r = encode_response(9, FAN_ALLOW);
        assert_eq!(i32::from_ne_bytes(r[..4].try_into().unwrap()), 9);
        assert_eq!(u32::from_ne_bytes(r[4..].try_into().unwrap()), 1);
    }
}
