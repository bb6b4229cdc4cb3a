#!/usr/bin/env python3
"""A stand-in for systemd's notify socket and file descriptor store, for
tests on machines where systemd is not PID 1.

It runs one service command and speaks the parts of the protocol kite
uses (sd_notify(3), sd_listen_fds(3)):
  - NOTIFY_SOCKET: a datagram socket; READY=1 and FDSTORE=1 (+ FDNAME=)
    messages are taken, the fds of FDSTORE messages kept in the store;
  - on each start the stored fds are passed as 3, 4, ... with LISTEN_PID,
    LISTEN_FDS and LISTEN_FDNAMES, as systemd 252 does.

Commands on stdin, one per line; answers on stdout, one per line:
  start          start the service      -> "started PID"
  kill           SIGKILL the service    -> "killed"
  store          the store's fd names   -> "store NAME NAME..."
  quit           kill the service, exit
Notifications are printed as they arrive: "notify READY=1", ...

    fake_service_manager.py DIR -- CMD [ARGS...]
"""

from __future__ import annotations

import array
import os
import signal
import socket
import subprocess
import sys
import threading

lock = threading.Lock()
store: list[tuple[str, int]] = []


def say(line: str) -> None:
    with lock:
        print(line, flush=True)


def listen(sock: socket.socket) -> None:
    while True:
        try:
            msg, anc, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
        except OSError:
            return
        fds: list[int] = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(data[: len(data) - (len(data) % a.itemsize)])
                fds.extend(a)
        fields = dict(
            line.split("=", 1) for line in msg.decode().splitlines() if "=" in line
        )
        if fields.get("FDSTORE") == "1":
            name = fields.get("FDNAME", "stored")
            with lock:
                for fd in fds:
                    store.append((name, fd))
            fds = []
        for fd in fds:
            os.close(fd)
        say("notify " + " ".join(f"{k}={v}" for k, v in fields.items()))


def main() -> None:
    if "--" not in sys.argv:
        raise SystemExit(__doc__)
    sep = sys.argv.index("--")
    workdir, cmd = sys.argv[1], sys.argv[sep + 1 :]
    path = os.path.join(workdir, "notify.sock")
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    threading.Thread(target=listen, args=(sock,), daemon=True).start()
    child: subprocess.Popen | None = None

    def start() -> subprocess.Popen:
        with lock:
            fds = [fd for _, fd in store]
            names = ":".join(n for n, _ in store)

        def in_child() -> None:
            # The stored fds become 3, 4, ...: first move them out of the
            # way, then into place.
            high = [os.dup(fd) for fd in fds]
            for i, fd in enumerate(high):
                os.dup2(fd, 3 + i, inheritable=True)
                os.close(fd)
            os.environ["LISTEN_PID"] = str(os.getpid())
            os.environ["LISTEN_FDS"] = str(len(fds))
            os.environ["LISTEN_FDNAMES"] = names

        env = dict(os.environ, NOTIFY_SOCKET=path)
        env.pop("LISTEN_PID", None)
        os.environ.update(env)
        return subprocess.Popen(cmd, preexec_fn=in_child, close_fds=False, stdin=subprocess.DEVNULL)

    for line in sys.stdin:
        c = line.strip()
        if c == "start":
            child = start()
            say(f"started {child.pid}")
        elif c == "kill":
            if child is not None:
                child.send_signal(signal.SIGKILL)
                child.wait()
            say("killed")
        elif c == "store":
            with lock:
                names = " ".join(n for n, _ in store)
            say("store " + names)
        elif c == "quit":
            break
    if child is not None and child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()


if __name__ == "__main__":
    main()
