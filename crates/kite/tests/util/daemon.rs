//! A `kite daemon` child process for end-to-end tests, lazy mounts through
//! it, and small HTTP servers on 127.0.0.1 for the HTTP backend: one that
//! serves Range requests (and can be stopped), one that never answers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{kite, kite_bin, kite_ok};

/// Root plus a kernel with the fanotify path (pre-content events and
/// file-backed EROFS).
pub fn fanotify_path() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root".into());
    }
    let f = kite_kernel::features::Features::probe();
    let missing = f.fanotify_missing();
    if !missing.is_empty() {
        return Err(format!("kernel {} lacks {}", f.release, missing.join(", ")));
    }
    Ok(())
}

pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub cache: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(dir: &Path, extra: &[&str]) -> Daemon {
        Self::start_in(dir, extra, None)
    }

    /// [`Daemon::start`] in network namespace `netns` (`ip netns` name):
    /// only its network is that namespace's (nsenter --net), so its files
    /// and mounts are the host's.
    pub fn start_in(dir: &Path, extra: &[&str], netns: Option<&str>) -> Daemon {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("kite.sock");
        let cache = dir.join("cache");
        let log = dir.join(format!(
            "daemon-{}.log",
            Instant::now().elapsed().as_nanos()
        ));
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}"))
                    .arg("--")
                    .arg(kite_bin());
                c
            }
            None => Command::new(kite_bin()),
        };
        let child = cmd
            .args(["daemon", "--kernel-path", "fanotify", "--cache-dir"])
            .arg(&cache)
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .env("KITE_LOG", "info,kite_daemon=debug")
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn kite daemon");
        let d = Daemon {
            child: Some(child),
            socket,
            cache,
            log,
        };
        let t = Instant::now();
        while kite(&["status", "--socket", d.socket.to_str().unwrap()])
            .status
            .code()
            != Some(0)
        {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "daemon did not start: {}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&kite_ok(&[
            "status",
            "--json",
            "--socket",
            self.socket.to_str().unwrap(),
        ]))
        .unwrap()
    }

    /// Sum of a numeric field over every blob of every image.
    pub fn blob_sum(&self, field: &str) -> u64 {
        self.status()["images"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|i| i["blobs"].as_array().unwrap().clone())
            .map(|b| b[field].as_u64().unwrap())
            .sum()
    }

    /// Backend requests of every image (each image has its own backend).
    pub fn backend_requests(&self) -> u64 {
        self.status()["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["blobs"][0]["backend_requests"].as_u64().unwrap_or(0))
            .sum()
    }

    pub fn mount(&self, source: &Path, mnt: &Path, extra: &[&str]) -> LazyMount {
        std::fs::create_dir_all(mnt).unwrap();
        let mut args = vec![
            "mount",
            source.to_str().unwrap(),
            mnt.to_str().unwrap(),
            "--socket",
            self.socket.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        kite_ok(&args);
        LazyMount {
            mnt: mnt.to_path_buf(),
            socket: self.socket.clone(),
            mounted: true,
        }
    }

    /// `kite profile MNT IMAGE_DIR` through this daemon: how many chunks
    /// the saved profile lists.
    pub fn save_profile(&self, mnt: &Path, image_dir: &Path) -> u64 {
        let said = kite_ok(&[
            "profile",
            mnt.to_str().unwrap(),
            image_dir.to_str().unwrap(),
            "--socket",
            self.socket.to_str().unwrap(),
        ]);
        // "profile of N chunks saved in ..."
        said.split_whitespace()
            .nth(2)
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("unexpected output of kite profile: {said}"))
    }

    /// The serving worker's pid (from status).
    pub fn worker_pid(&self) -> i32 {
        self.status()["health"]["pid"].as_i64().unwrap() as i32
    }

    /// The holder's pid (the process this handle started, or the one that
    /// took over).
    pub fn holder_pid(&self) -> i32 {
        self.status()["health"]["holder_pid"].as_i64().unwrap() as i32
    }

    /// The started holder process, if it is still this handle's.
    pub fn child_pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Wait for the started holder to exit (after a hand-over or a stop).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        let t = Instant::now();
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                self.child = None;
                return Some(s);
            }
            if t.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Forget the started process without stopping it (it was replaced).
    pub fn disown(&mut self) {
        self.child = None;
    }

    /// Stop with SIGTERM and wait.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let t = Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if t.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
    }
}

pub struct LazyMount {
    pub mnt: PathBuf,
    socket: PathBuf,
    mounted: bool,
}

impl LazyMount {
    pub fn umount(mut self) {
        kite_ok(&[
            "umount",
            self.mnt.to_str().unwrap(),
            "--socket",
            self.socket.to_str().unwrap(),
        ]);
        self.mounted = false;
    }
}

impl Drop for LazyMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// An HTTP/1.1 server on 127.0.0.1 serving files under `root` with Range
/// support, counting requests and body bytes. `stop` closes the listener
/// and every connection.
pub struct RangeServer {
    pub url: String,
    pub requests: Arc<AtomicU64>,
    pub bytes: Arc<AtomicU64>,
    /// Milliseconds each response waits before it is sent (slows a cold
    /// read down, so faults land in the middle of it).
    pub delay_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    addr: std::net::SocketAddr,
}

impl RangeServer {
    pub fn start(root: &Path) -> RangeServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let s = RangeServer {
            url: format!("http://{addr}"),
            requests: Arc::default(),
            bytes: Arc::default(),
            delay_ms: Arc::default(),
            stop: Arc::default(),
            conns: Arc::default(),
            addr,
        };
        let (root, req, bytes, stop, conns, delay) = (
            root.to_path_buf(),
            s.requests.clone(),
            s.bytes.clone(),
            s.stop.clone(),
            s.conns.clone(),
            s.delay_ms.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                conns.lock().unwrap().push(conn.try_clone().unwrap());
                let (root, req, bytes, delay) =
                    (root.clone(), req.clone(), bytes.clone(), delay.clone());
                std::thread::spawn(move || serve_conn(conn, &root, &req, &bytes, &delay));
            }
        });
        s
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for RangeServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_conn(conn: TcpStream, root: &Path, req: &AtomicU64, bytes: &AtomicU64, delay: &AtomicU64) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut range = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some(v) = h
                .strip_prefix("Range: bytes=")
                .or_else(|| h.strip_prefix("range: bytes="))
            {
                let (a, b) = v.split_once('-').unwrap();
                range = Some((a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap()));
            }
        }
        req.fetch_add(1, Ordering::SeqCst);
        let ms = delay.load(Ordering::Relaxed);
        if ms > 0 {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let file = root.join(path.trim_start_matches('/'));
        let Ok(data) = std::fs::read(&file) else {
            let _ = out.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
            continue;
        };
        let (status, body, extra) = match range {
            Some((a, b)) if (b as usize) < data.len() => (
                "206 Partial Content",
                &data[a as usize..=b as usize],
                format!("content-range: bytes {a}-{b}/{}\r\n", data.len()),
            ),
            _ => ("200 OK", &data[..], String::new()),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\n{extra}\r\n",
            body.len()
        );
        if out
            .write_all(head.as_bytes())
            .and_then(|_| out.write_all(body))
            .is_err()
        {
            return;
        }
        bytes.fetch_add(body.len() as u64, Ordering::SeqCst);
    }
}

/// Accepts connections and never answers.
pub fn hanging_server() -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let h = std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().flatten() {
            let mut c2 = c.try_clone().unwrap();
            held.push(c);
            std::thread::spawn(move || {
                let mut b = [0u8; 1024];
                while c2.read(&mut b).map(|n| n > 0).unwrap_or(false) {}
            });
        }
    });
    (url, h)
}
