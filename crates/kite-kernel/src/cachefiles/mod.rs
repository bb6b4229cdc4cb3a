//! The cachefiles on-demand interface: the device behind a trait, so the
//! daemon's logic runs against a simulated kernel in tests.
//!
//! [`CacheDevice`] is `/dev/cachefiles` (set-up commands, messages, `copen`
//! replies). A [`Request::Open`] carries a [`CacheObject`], the cache file's
//! anonymous fd as an owned object: writes land in the cache file, and
//! [`CacheObject::complete_read`] is the READ completion ioctl. Dropping the
//! object closes the fd, which is what CLOSE asks for.

pub mod proto;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

pub use proto::{Message, ProtoError};

use crate::uring::{AlignedBuf, Writer};
use crate::KernelError;

/// A decoded request with kernel resources attached.
pub enum Request {
    Open {
        msg_id: u32,
        object_id: u32,
        volume_key: Vec<u8>,
        cookie_key: Vec<u8>,
        object: Arc<dyn CacheObject>,
    },
    Close {
        msg_id: u32,
        object_id: u32,
    },
    Read {
        msg_id: u32,
        object_id: u32,
        off: u64,
        len: u64,
    },
    /// A message with a valid header but a bad body. The daemon still
    /// answers it (a failed `copen` for an OPEN, a completion for a READ),
    /// so no kernel request is left hanging.
    Malformed {
        msg_id: u32,
        opcode: u32,
        object_id: u32,
        error: ProtoError,
    },
}

/// A future returned by the object's writes.
pub type WriteFuture = std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<()>> + Send>>;

/// One cache file opened for the daemon by an OPEN.
pub trait CacheObject: Send + Sync {
    /// Write page-aligned `buf` at page-aligned `off` of the cache file.
    fn write_at(&self, off: u64, buf: AlignedBuf) -> WriteFuture;
    /// Tell the kernel READ `msg_id` on this object is done. Without data
    /// written for the range, the reader gets EIO.
    fn complete_read(&self, msg_id: u32) -> io::Result<()>;
    /// Identity of the cache file this object writes to: a fetch started
    /// for one object may only satisfy requests for the same target.
    fn target(&self) -> u64;
}

/// `/dev/cachefiles` or a simulation of it.
pub trait CacheDevice: Send + Sync {
    /// The next pending request, or `None` when nothing is pending.
    fn next_request(&self) -> Result<Option<Request>, KernelError>;
    /// Reply to an OPEN with the cache file size, or a negative errno.
    fn copen(&self, msg_id: u32, size_or_errno: i64) -> Result<(), KernelError>;
    /// Wait until requests may be pending. The caller then calls
    /// `next_request` until it returns `None`.
    fn wait(&self) -> WaitFuture<'_>;
}

/// A future returned by [`CacheDevice::wait`].
pub type WaitFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), KernelError>> + Send + 'a>>;

/// The real device. Must be created inside a tokio runtime.
pub struct Device {
    file: AsyncFd<File>,
    /// Serialises command writes (each write is one command).
    cmd: Mutex<()>,
    writer: Arc<Writer>,
}

impl Device {
    /// Open `/dev/cachefiles` (non-blocking) and bind it on `cache_dir` in
    /// on-demand mode with `tag`; serve it in this process.
    pub fn bind(cache_dir: &Path, tag: &str, writer: Arc<Writer>) -> Result<Self, KernelError> {
        Self::from_fd(Self::open_bound(cache_dir, tag)?, writer)
    }

    /// Open `/dev/cachefiles` and bind it on `cache_dir` in on-demand mode
    /// with `tag`; return the fd (the holder keeps it; workers serve it
    /// through [`Device::from_fd`]). The cache lives as long as any copy
    /// of this fd.
    pub fn open_bound(cache_dir: &Path, tag: &str) -> Result<OwnedFd, KernelError> {
        let path = Path::new("/dev/cachefiles");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| KernelError::Io {
                what: format!(
                    "opening /dev/cachefiles ({})",
                    if e.raw_os_error() == Some(libc::EBUSY) {
                        "another daemon holds it"
                    } else if e.kind() == io::ErrorKind::NotFound {
                        "kernel lacks CONFIG_CACHEFILES"
                    } else {
                        "check CONFIG_CACHEFILES_ONDEMAND and that you are root"
                    }
                ),
                source: e,
            })?;
        for cmd in [
            format!("dir {}", cache_dir.display()),
            format!("tag {tag}"),
            "bind ondemand".to_string(),
        ] {
            file.write_all(cmd.as_bytes())
                .map_err(|e| KernelError::Io {
                    what: format!("cachefiles command {cmd:?}"),
                    source: e,
                })?;
        }
        Ok(file.into())
    }

    /// Serve a bound device fd created elsewhere (a worker taking over
    /// from one that died or stopped calls [`Device::restore`] next). Must
    /// run inside a tokio runtime.
    pub fn from_fd(fd: OwnedFd, writer: Arc<Writer>) -> Result<Self, KernelError> {
        let file = File::from(fd);
        // SAFETY: the AsyncFd takes ownership of the File, so the fd stays
        // open for exactly as long as it is registered with the reactor and
        // is deregistered before it is closed (AsyncFd's drop order).
        let file =
            unsafe { AsyncFd::register_with_interest(file, Interest::READABLE) }.map_err(|e| {
                KernelError::Io {
                    what: "registering /dev/cachefiles with the reactor".into(),
                    source: e.into(),
                }
            })?;
        let dev = Self {
            file,
            cmd: Mutex::new(()),
            writer,
        };
        Ok(dev)
    }

    /// Write `restore`: requests a previous daemon read but did not answer
    /// are delivered again, and objects whose fd it closed are opened
    /// again with a new OPEN (the failover series: Linux 6.8+, and
    /// backports). A kernel without it refuses the command (EINVAL).
    pub fn restore(&self) -> Result<(), KernelError> {
        self.command("restore")
    }

    /// The device fd (to hand a copy to another process).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.get_ref().as_fd()
    }

    /// A handle that culls cache files of this bound cache, usable from
    /// any thread (it owns a copy of the device fd).
    pub fn culler(&self) -> Result<Culler, KernelError> {
        let fd = self
            .fd()
            .try_clone_to_owned()
            .map_err(|e| KernelError::Io {
                what: "duplicating the /dev/cachefiles fd".into(),
                source: e,
            })?;
        Ok(Culler {
            dev: File::from(fd),
        })
    }

    fn command(&self, cmd: &str) -> Result<(), KernelError> {
        let _guard = self.cmd.lock().map_err(|_| KernelError::Poisoned)?;
        self.file
            .get_ref()
            .write_all(cmd.as_bytes())
            .map_err(|e| KernelError::Io {
                what: format!("cachefiles command {cmd:?}"),
                source: e,
            })
    }
}

/// Deletes cache files of a bound cache through the `cull` command: the
/// only sanctioned way to remove them while the cache is bound (the
/// kernel refuses a file an object still uses).
pub struct Culler {
    dev: File,
}

/// How a cull ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Culled {
    /// The file is gone.
    Removed,
    /// A cache object uses it (a mounted image, or one still being
    /// withdrawn after its unmount): left alone.
    Busy,
    /// No such file (already gone, or never linked: an object's file is
    /// an unnamed temporary file until it is withdrawn).
    Missing,
}

impl Culler {
    /// Cull `dir/name`. The kernel looks `name` up in the writing
    /// thread's working directory, so the command is written from a
    /// short-lived thread with its own filesystem context
    /// (`unshare(CLONE_FS)`): the process's working directory never
    /// changes.
    pub fn cull(&self, dir: &Path, name: &str) -> Result<Culled, KernelError> {
        if name.is_empty() || name.contains('/') {
            return Err(KernelError::Io {
                what: format!("culling {name:?}"),
                source: io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        let err = |what: String| move |e: io::Error| KernelError::Io { what, source: e };
        std::thread::scope(|s| {
            s.spawn(|| -> Result<Culled, KernelError> {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)
                    .map_err(|e| io::Error::from_raw_os_error(e as i32))
                    .map_err(err("unshare(CLONE_FS) for a cull".into()))?;
                std::env::set_current_dir(dir)
                    .map_err(err(format!("entering {}", dir.display())))?;
                match (&self.dev).write_all(format!("cull {name}").as_bytes()) {
                    Ok(()) => Ok(Culled::Removed),
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(Culled::Busy),
                    Err(e)
                        if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESTALE)) =>
                    {
                        Ok(Culled::Missing)
                    }
                    Err(e) => Err(KernelError::Io {
                        what: format!("cachefiles command \"cull {name}\" in {}", dir.display()),
                        source: e,
                    }),
                }
            })
            .join()
            .unwrap_or_else(|_| {
                Err(KernelError::Io {
                    what: format!("culling {name}: the culling thread panicked"),
                    source: io::Error::other("panic"),
                })
            })
        })
    }
}

impl CacheDevice for Device {
    fn next_request(&self) -> Result<Option<Request>, KernelError> {
        let mut buf = [0u8; proto::MSG_MAX_SIZE];
        let n = {
            match self.file.get_ref().read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(None),
                Err(e) => {
                    return Err(KernelError::Io {
                        what: "reading /dev/cachefiles".into(),
                        source: e,
                    })
                }
            }
        };
        // Before 6.8 poll may wake us with nothing new: 0 means no message.
        if n == 0 {
            return Ok(None);
        }
        let raw = &buf[..n];
        // An OPEN's fd is ours from the moment read() returned: own it now,
        // even if the rest of the message is bad, so it cannot leak.
        let is_open = raw.len() >= HEADER_OPEN_FD + 4
            && u32::from_ne_bytes(raw[4..8].try_into().expect("4 bytes")) == proto::OPCODE_OPEN;
        let owned = is_open.then(|| {
            own_fd(u32::from_ne_bytes(
                raw[HEADER_OPEN_FD..HEADER_OPEN_FD + 4]
                    .try_into()
                    .expect("4 bytes"),
            ))
        });
        let msg = match proto::parse(raw) {
            Ok(m) => m,
            Err(error) if raw.len() >= proto::HEADER_SIZE => {
                let field =
                    |i: usize| u32::from_ne_bytes(raw[i..i + 4].try_into().expect("4 bytes"));
                return Ok(Some(Request::Malformed {
                    msg_id: field(0),
                    opcode: field(4),
                    object_id: field(12),
                    error,
                }));
            }
            Err(e) => return Err(KernelError::Proto(e)),
        };
        match msg {
            Message::Open {
                msg_id,
                object_id,
                volume_key,
                cookie_key,
                ..
            } => Ok(Some(Request::Open {
                msg_id,
                object_id,
                volume_key,
                cookie_key,
                object: Arc::new(AnonFd {
                    fd: Arc::new(owned.ok_or_else(|| KernelError::Io {
                        what: "OPEN message without an fd".into(),
                        source: io::Error::from(io::ErrorKind::InvalidData),
                    })?),
                    writer: Arc::clone(&self.writer),
                }),
            })),
            Message::Close { msg_id, object_id } => Ok(Some(Request::Close { msg_id, object_id })),
            Message::Read {
                msg_id,
                object_id,
                off,
                len,
            } => Ok(Some(Request::Read {
                msg_id,
                object_id,
                off,
                len,
            })),
        }
    }

    fn copen(&self, msg_id: u32, size_or_errno: i64) -> Result<(), KernelError> {
        self.command(&proto::copen(msg_id, size_or_errno))
    }

    fn wait(&self) -> WaitFuture<'_> {
        Box::pin(async move {
            let mut guard = self.file.readable().await.map_err(|e| KernelError::Io {
                what: "polling /dev/cachefiles".into(),
                source: e,
            })?;
            // Clear before the caller drains: a message arriving after the
            // drain's last read raises a new edge and wakes the next wait.
            guard.clear_ready();
            Ok(())
        })
    }
}

const HEADER_OPEN_FD: usize = proto::HEADER_SIZE + 8;

fn own_fd(fd: u32) -> OwnedFd {
    // SAFETY: the kernel installed this fd in our table for this OPEN message
    // (cachefiles_ondemand_get_fd) and nothing else refers to it; taking
    // ownership here is the only place it is wrapped, so it is closed exactly
    // once, when the last reference to the object is dropped.
    let owned = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // The kernel installs it without O_CLOEXEC: a copy leaked into a child
    // would keep the object open under an id a restarted worker does not
    // know, stranding its READs after `restore`.
    let _ = nix::fcntl::fcntl(
        owned.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    owned
}

/// The anonymous fd of one cache file.
pub struct AnonFd {
    fd: Arc<OwnedFd>,
    writer: Arc<Writer>,
}

impl AsFd for AnonFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

nix::ioctl_write_int!(cachefiles_ioc_read_complete, 0x98, 1);

impl CacheObject for AnonFd {
    fn write_at(&self, off: u64, buf: AlignedBuf) -> WriteFuture {
        let rx = self.writer.submit(Arc::clone(&self.fd), off, buf);
        Box::pin(async move {
            rx.await
                .map_err(|_| io::Error::other("io_uring writer stopped"))?
        })
    }

    fn target(&self) -> u64 {
        // One anonymous fd per OPEN: the fd object's address names it.
        Arc::as_ptr(&self.fd) as u64
    }

    fn complete_read(&self, msg_id: u32) -> io::Result<()> {
        // SAFETY: CACHEFILES_IOC_READ_COMPLETE takes the msg_id by value
        // (an int, not a pointer), on an fd we own and keep open.
        unsafe { cachefiles_ioc_read_complete(self.fd.as_raw_fd(), msg_id as _) }
            .map(|_| ())
            .map_err(io::Error::from)
    }
}
