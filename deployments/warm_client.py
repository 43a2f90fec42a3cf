"""The command a process worker runs for each flow run: ``python -I -S warm_client.py SOCKET``.

It asks the warm executor listening on ``SOCKET`` (:mod:`atomforge.deployments.warm_exec`)
to run the flow run in a forked child, as ``python -m prefect.engine`` would, with this
process's environment, working directory and standard streams (passed over the socket).
Then it waits: SIGTERM, SIGINT and SIGHUP are relayed to the child (a cancel from Prefect
kills this pid), and it ends as the child ended (its exit code, or the same signal). A
child whose client goes away, also by ``kill -9``, stops its run.

When no executor answers, or it refuses the request (other ``PREFECT_*`` settings, code
changed since it started, stopping), this process becomes ``python -m prefect.engine``
(``exec``), the path without the executor.

It imports the standard library only and runs without ``site``: it starts in about 20 ms.
The executor, and the local server of ``atomforge`` commands
(:mod:`atomforge.flows.local_server`), import the wire format from here
(:func:`send_request`, :func:`recv_request`, :func:`send_line`, :func:`read_line`,
:func:`same_user`, :func:`standard_fds`), and the runner zygote
(:mod:`atomforge.engines.zygote`) its children's exits (:func:`reap_children`).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys

MAX_REQUEST_BYTES = 16 << 20
RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def send_request(sock: socket.socket, request: dict, fds: list[int]) -> None:
    """Send ``request`` (JSON) with the descriptors ``fds`` over ``sock``."""
    body = json.dumps(request).encode()
    socket.send_fds(sock, [struct.pack("!I", len(body))], fds)
    sock.sendall(body)


def recv_request(sock: socket.socket, nfds: int = 3) -> tuple[dict, list[int]]:
    """Return a request sent by :func:`send_request` and the ``nfds`` descriptors it
    carried (ValueError for a malformed one)."""
    fds = array.array("i")
    head, ancillary, _, _ = sock.recvmsg(4, socket.CMSG_LEN(nfds * fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if len(head) != 4 or len(fds) != nfds:
        for fd in fds:
            os.close(fd)
        raise ValueError("bad request")
    (size,) = struct.unpack("!I", head)
    body = bytearray()
    while len(body) < min(size, MAX_REQUEST_BYTES + 1):
        chunk = sock.recv(size - len(body))
        if not chunk:
            break
        body.extend(chunk)
    if len(body) != size or size > MAX_REQUEST_BYTES:
        for fd in fds:
            os.close(fd)
        raise ValueError("short or oversized request")
    return json.loads(body), list(fds)


def send_line(sock: socket.socket, message: dict) -> None:
    """Send ``message`` as one JSON line."""
    sock.sendall(json.dumps(message).encode() + b"\n")


def read_line(sock: socket.socket, buffer: bytearray) -> dict | None:
    """Return the next JSON line from ``sock``, or None at its end."""
    while b"\n" not in buffer:
        try:
            chunk = sock.recv(4096)
        except InterruptedError:
            continue
        except OSError:
            return None
        if not chunk:
            return None
        buffer.extend(chunk)
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return json.loads(line)


def same_user(conn: socket.socket) -> bool:
    """Return whether the peer of the Unix socket ``conn`` runs as this process's user."""
    peer = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", peer)[1] == os.getuid()


def exit_message(status: int) -> dict:
    """Return what a client is told of a child that ended with wait ``status``."""
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    return {"exit": os.waitstatus_to_exitcode(status)}


def reap_children(children: dict[int, socket.socket]) -> None:
    """Tell the client of each child in ``children`` (pid: its client's connection) that
    ended how it ended, and forget it; return None once no ended child is left."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(OSError):
                send_line(conn, exit_message(status))
            conn.close()


def standard_fds() -> list[int]:
    """Return this process's stdin, stdout and stderr (/dev/null for a closed one)."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def _engine_argv() -> list[str]:
    """Return the command line of the path without the executor."""
    return [sys.executable, "-m", "prefect.engine", *sys.argv[2:]]


def _wait_for_exit(pid: int) -> None:
    """Return once process ``pid`` (not a child of this one) has ended."""
    with contextlib.suppress(OSError):
        handle = os.pidfd_open(pid)
        select.select([handle], [], [])


def _end_as(status: dict) -> int:
    """Return the exit code the child ended with, or end this process by the signal that
    ended the child (so the worker sees what it would have seen of the engine)."""
    if "signal" in status:
        signum = int(status["signal"])
        if signum in RELAYED:
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return 128 + signum
    return int(status["exit"])


def run(socket_path: str) -> int:
    """Run this flow run through the executor at ``socket_path``; return the child's exit
    code (only if it is not ``exec``-ed into the engine instead)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
        request = {"env": dict(os.environ), "cwd": os.getcwd(), "argv": sys.argv[2:]}
        send_request(sock, request, standard_fds())
    except OSError:
        sock.close()
        os.execv(sys.executable, _engine_argv())
    buffer = bytearray()
    started = read_line(sock, buffer)
    if started is None or "pid" not in started:
        why = (started or {}).get("refused", "no answer")
        print(f"warm executor: {why}; starting the engine itself", file=sys.stderr, flush=True)
        sock.close()
        os.execv(sys.executable, _engine_argv())
    child = int(started["pid"])

    def relay(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in RELAYED:
        signal.signal(signum, relay)
    finished = read_line(sock, buffer)
    if finished is None:
        print("warm executor went away; waiting for the flow run's process", file=sys.stderr)
        _wait_for_exit(child)
        return 1
    return _end_as(finished)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -I -S warm_client.py SOCKET")
    sys.exit(run(sys.argv[1]))
