//! Passing kernel-interface fds between kite's processes.
//!
//! The fanotify group and the `/dev/cachefiles` fd must outlive the worker
//! that serves them (a crash of the process that fetches and parses must
//! not close them). The holder keeps them and hands copies to each worker
//! by inheritance ([`inheritable`], [`take_env_fd`]), and to a successor
//! holder over a unix socket with `SCM_RIGHTS` ([`send`], [`recv`]).
//!
//! Messages on those sockets are one line each, and at most one message
//! is in flight per direction when fds travel with it, so one `recvmsg`
//! returns exactly the message the fds belong to.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// Most fds one message carries.
pub const MAX_FDS: usize = 8;

/// Send `data` with `fds` attached (all or nothing).
pub fn send(sock: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::other(format!(
            "{} fds in one message, at most {MAX_FDS}",
            fds.len()
        )));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let iov = [io::IoSlice::new(data)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    let n = sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(io::Error::from)?;
    if n != data.len() {
        return Err(io::Error::other(format!(
            "short send of a control message ({n} of {} bytes)",
            data.len()
        )));
    }
    Ok(())
}

/// Receive one message into `buf`: its length and the fds that came with
/// it, each owned from here on (fds beyond what the message should carry
/// are closed by the caller dropping them).
pub fn recv(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(list) = c {
            for fd in list {
                // SAFETY: the kernel installed this fd in our table for
                // this message (SCM_RIGHTS); nothing else refers to it, and
                // it is wrapped exactly once, here.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    let n = msg.bytes;
    if truncated {
        return Err(io::Error::other(
            "control message truncated (more fds than expected)",
        ));
    }
    Ok((n, fds))
}

/// A copy of `fd` that a child process inherits (no `FD_CLOEXEC`). The
/// caller passes its number to the child and drops it after the spawn.
pub fn inheritable(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let copy = fd.try_clone_to_owned()?;
    fcntl(copy.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())).map_err(io::Error::from)?;
    Ok(copy)
}

/// Take ownership of an fd a parent passed by inheritance, named by the
/// environment variable `var` (its number). The variable is removed, so the
/// fd is wrapped at most once; the fd gets `FD_CLOEXEC` again. None if the
/// variable is unset; an error if it names no open fd.
pub fn take_env_fd(var: &str) -> io::Result<Option<OwnedFd>> {
    let Ok(v) = std::env::var(var) else {
        return Ok(None);
    };
    std::env::remove_var(var);
    let fd: RawFd = v
        .trim()
        .parse()
        .map_err(|_| io::Error::other(format!("{var}={v:?} is not an fd number")))?;
    if fd < 3 {
        return Err(io::Error::other(format!(
            "{var}={fd}: not an inherited fd (0-2 are stdio)"
        )));
    }
    // Is it open at all? (F_GETFD fails with EBADF otherwise.)
    fcntl(fd, FcntlArg::F_GETFD)
        .map_err(|e| io::Error::other(format!("{var}={fd}: no such open fd ({e})")))?;
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(io::Error::from)?;
    // SAFETY: the fd is open (checked above), our parent passed it for us
    // to own under this variable, and removing the variable first means
    // no second call wraps it again.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The fds a service manager passed with `LISTEN_FDS` (systemd's fd store
/// gives stored fds back this way), with their `LISTEN_FDNAMES` names. The
/// variables are checked against our pid (`LISTEN_PID`) and removed, so
/// each fd is wrapped once; an fd that is not open is skipped.
pub fn take_listen_fds() -> Vec<(String, OwnedFd)> {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let n: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    if !pid_ok || n <= 0 {
        return Vec::new();
    }
    let mut names = names.split(':').map(String::from);
    let mut out = Vec::new();
    // sd_listen_fds(3): the fds are 3, 4, ... in order.
    for fd in 3..3 + n.min(1024) {
        let name = names.next().unwrap_or_default();
        if fcntl(fd, FcntlArg::F_GETFD).is_err() {
            continue;
        }
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
        // SAFETY: LISTEN_PID names this process, so the service manager
        // passed these fds for us to own; the variables were removed above
        // so they are wrapped once, and the fd is open (checked).
        out.push((name, unsafe { OwnedFd::from_raw_fd(fd) }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn fds_travel_with_their_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut r, mut w) = UnixStream::pair().unwrap();
        send(&a, b"take these\n", &[w.as_fd()]).unwrap();
        let mut buf = [0u8; 64];
        let (n, fds) = recv(&b, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"take these\n");
        assert_eq!(fds.len(), 1);
        // The received fd is the same socket end: writing through it
        // reaches the peer.
        let mut got = UnixStream::from(fds.into_iter().next().unwrap());
        got.write_all(b"x").unwrap();
        drop(w.flush());
        let mut one = [0u8; 1];
        r.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"x");
        w.write_all(b"y").unwrap();
    }

    #[test]
    fn a_message_without_fds_has_none() {
        let (a, b) = UnixStream::pair().unwrap();
        send(&a, b"plain\n", &[]).unwrap();
        let mut buf = [0u8; 64];
        let (n, fds) = recv(&b, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"plain\n");
        assert!(fds.is_empty());
    }

    #[test]
    fn env_fds_are_checked() {
        std::env::set_var("KITE_TEST_FD_BAD", "not-a-number");
        assert!(take_env_fd("KITE_TEST_FD_BAD").is_err());
        std::env::set_var("KITE_TEST_FD_STDIO", "1");
        assert!(take_env_fd("KITE_TEST_FD_STDIO").is_err());
        assert!(take_env_fd("KITE_TEST_FD_UNSET").unwrap().is_none());
        let (a, _b) = UnixStream::pair().unwrap();
        let copy = inheritable(a.as_fd()).unwrap();
        let flags = fcntl(copy.as_raw_fd(), FcntlArg::F_GETFD).unwrap();
        assert_eq!(flags & FdFlag::FD_CLOEXEC.bits(), 0, "inheritable copy");
        let n = copy.as_raw_fd();
        std::mem::forget(copy); // ownership moves to take_env_fd below
        std::env::set_var("KITE_TEST_FD_OK", n.to_string());
        let owned = take_env_fd("KITE_TEST_FD_OK").unwrap().unwrap();
        assert_eq!(owned.as_raw_fd(), n);
        assert!(
            std::env::var("KITE_TEST_FD_OK").is_err(),
            "variable removed"
        );
        let flags = fcntl(n, FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & FdFlag::FD_CLOEXEC.bits(), 0, "CLOEXEC again");
    }
}
