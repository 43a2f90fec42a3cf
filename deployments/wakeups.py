"""Wake-ups for the service's pollers: the Prefect server's word, as it happens, that a
run of a work pool was scheduled.

The consumer and the batcher asked the server every 0.2 s whether a run of their pool
was due: ten calls a second, about a tenth of a core of the server's CPU while nothing
happens, and a request waited half a poll on average. With :class:`ScheduledRuns` each
subscribes to the server's stream of flow-run events (the ``/api/events/out`` websocket,
only runs that enter a Scheduled-type state: Scheduled, AwaitingRetry, Late, Resuming)
and asks at once when one of its pool's comes. It keeps asking every 0.2 s after (the
server sends the event from inside its transaction, so the run may not be visible for a
moment), until its polls have found each run announced (:meth:`found`), for at most
:data:`ALERT_SECONDS`; otherwise every ``idle_poll_seconds`` (a run of a schedule becomes
due without an event). Each of those asks costs the server about 10 ms of CPU: a
request that kept the consumer asking for the whole window cost it ten. With
``ends=True`` (the consumer) a run of the pool that ended also counts once: its slot
under the pool's limit may go to a run that waits. While the stream is down (the
server restarting) it polls as before and reconnects every :data:`RECONNECT_SECONDS`.
The stream is only a shortcut: whatever goes wrong with it, the owner polls.

It starts no thread: the websocket is a plain socket driven by websockets' sans-I/O
protocol, which the caller waits on (``select``, or its event loop's reader), so that
the consumer may still fork its children.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

ALERT_SECONDS = 2.0
"""How long a poller keeps asking every fast interval after a run of its pool was scheduled."""
RECONNECT_SECONDS = 5.0
"""How often a lost subscription is tried again."""
CONNECT_TIMEOUT_SECONDS = 2.0
READ_BYTES = 1 << 16
WAITING, ENDED = "SCHEDULED", ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
ALWAYS = "2000-01-01T00:00:00Z", "2999-01-01T00:00:00Z"
"""The stream sends only events that occurred within its filter's window: all of them."""


class ScheduledRuns:
    """A subscription to the server's events of flow runs of ``pool`` that became
    Scheduled (and, with ``ends``, that ended), and when its owner should ask the server
    for due runs."""

    def __init__(
        self, api_url: str, auth: str, pool: str, idle_poll_seconds: float, ends: bool = False
    ) -> None:
        parts = urlsplit(api_url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.uri = parse_uri(f"ws://{self.address[0]}:{self.address[1]}{parts.path}/events/out")
        self.auth = auth
        self.pool = pool
        self.idle_poll_seconds = idle_poll_seconds
        self.states = [WAITING, *ENDED] if ends else [WAITING]
        self.ended = False
        self.sock: socket.socket | None = None
        self.protocol: ClientProtocol | None = None
        self.tried_at = -RECONNECT_SECONDS
        self.unseen: dict[str, float] = {}
        self.found_at: dict[str, float] = {}
        self.blind_until = -ALERT_SECONDS
        self.polled_at = -idle_poll_seconds
        self.said_down = False

    @property
    def connected(self) -> bool:
        """Return whether the subscription is open."""
        return self.sock is not None

    def fileno(self) -> int:
        """Return the subscription's socket (call only while :attr:`connected`)."""
        assert self.sock is not None
        return self.sock.fileno()

    @property
    def may_connect(self) -> bool:
        """Return whether :meth:`connect` would try now: not subscribed, and the last try
        :data:`RECONNECT_SECONDS` ago or more."""
        return not self.connected and time.monotonic() - self.tried_at >= RECONNECT_SECONDS

    def connect(self) -> bool:
        """Subscribe, unless subscribed or the last try was less than
        :data:`RECONNECT_SECONDS` ago; return whether it is subscribed. A fresh
        subscription counts as a word from the server of runs it does not name (those
        scheduled meanwhile were not announced): its polls go on for the whole window."""
        if not self.may_connect:
            return self.connected
        now = self.tried_at = time.monotonic()
        try:
            self._open()
        except Exception as exc:  # the stream is a shortcut: without it, the owner polls
            if not self.said_down:
                print(f"no event stream ({type(exc).__name__}: {exc}): polling", flush=True)
            self.said_down = True
            self.close()
            return False
        print(f"listening to the server's scheduled runs of pool {self.pool}", flush=True)
        self.said_down = False
        self.blind_until = now + ALERT_SECONDS
        return True

    def _open(self) -> None:
        """Open the websocket, authenticate and send the filter; raise OSError, or
        ValueError when the server refused."""
        sock = socket.create_connection(self.address, timeout=CONNECT_TIMEOUT_SECONDS)
        self.sock = sock
        self.protocol = ClientProtocol(self.uri, subprotocols=[Subprotocol("prefect")])
        self.protocol.send_request(self.protocol.connect())
        self._flush()
        while self.protocol.state is State.CONNECTING:
            if self.protocol.handshake_exc is not None:
                raise ValueError(f"websocket refused: {self.protocol.handshake_exc}")
            self._receive(self._recv())
        self._send({"type": "auth", "token": self.auth})
        while not (answers := self._messages()):
            self._receive(self._recv())
        if answers[0].get("type") != "auth_success":
            raise ValueError(f"the server refused the event stream's auth: {answers[0]}")
        since, until = ALWAYS
        labels = {"prefect.state-type": self.states}
        stream = {
            "occurred": {"since": since, "until": until},
            "event": {"prefix": ["prefect.flow-run."]},
            "resource": {"labels": labels},
        }
        self._send({"type": "filter", "backfill": False, "filter": stream})
        sock.setblocking(False)

    def _recv(self) -> bytes:
        """Return the bytes the socket has (blocking while connecting); raise OSError
        when the server closed it."""
        assert self.sock is not None
        data = self.sock.recv(READ_BYTES)
        if not data:
            raise ConnectionResetError("the server closed the event stream")
        return data

    def _receive(self, data: bytes) -> None:
        """Feed ``data`` to the protocol and send what it answers (pongs)."""
        assert self.protocol is not None
        self.protocol.receive_data(data)
        self._flush()

    def _flush(self) -> None:
        assert self.sock is not None and self.protocol is not None
        for chunk in self.protocol.data_to_send():
            self.sock.sendall(chunk)

    def _send(self, message: dict) -> None:
        assert self.protocol is not None
        self.protocol.send_text(json.dumps(message).encode())
        self._flush()

    def _messages(self) -> list[dict]:
        """Return the text messages the protocol received since the last call; raise
        ConnectionResetError once the server closed the stream."""
        assert self.protocol is not None
        received = self.protocol.events_received()
        if self.protocol.state is not State.OPEN:
            reason = self.protocol.close_rcvd.reason if self.protocol.close_rcvd else ""
            raise ConnectionResetError(f"the server closed the event stream {reason}".strip())
        return [
            json.loads(event.data)
            for event in received
            if not isinstance(event, Response) and event.opcode is Opcode.TEXT
        ]

    def read(self) -> bool:
        """Read what the socket holds without blocking; return whether it told of a run of
        the pool, scheduled or (with ``ends``) ended (then :meth:`poll_due` says yes), or
        was lost. A lost stream is closed here
        (polling goes on, and :meth:`connect` tries again); so is one that sent what this
        cannot read."""
        heard = False
        try:
            while True:
                try:
                    data = self._recv()
                except BlockingIOError:
                    break
                self._receive(data)
                for message in self._messages():
                    if message.get("type") == "event":
                        heard |= self._hear(message["event"])
        except Exception as exc:  # the stream is a shortcut: without it, the owner polls
            print(f"event stream lost ({type(exc).__name__}: {exc}): polling", flush=True)
            self.close()
            return True
        self._forget(time.monotonic())
        return heard

    def _hear(self, event: dict) -> bool:
        """Note ``event`` if it is of a run of the pool: one scheduled starts polls until
        it is :meth:`found` (at most :data:`ALERT_SECONDS`), one ended makes one poll;
        return whether it was."""
        of_pool = any(
            related.get("prefect.resource.role") == "work-pool"
            and related.get("prefect.resource.name") == self.pool
            for related in event.get("related", [])
        )
        if of_pool and event["resource"].get("prefect.state-type") == WAITING:
            run_id = event["resource"]["prefect.resource.id"].rpartition(".")[2]
            if run_id not in self.found_at:  # else told after a poll found it
                self.unseen[run_id] = time.monotonic()
        elif of_pool:
            self.ended = True
        return of_pool

    def wait(self, seconds: float) -> None:
        """Wait ``seconds``, or less when the server sends something (subscribing first
        if not subscribed), and read it."""
        if not self.connect():
            time.sleep(seconds)
            return
        waiting = select.poll()
        waiting.register(self.fileno(), select.POLLIN)
        if waiting.poll(seconds * 1000):
            self.read()

    def found(self, run_ids: Iterable[str]) -> None:
        """Note the runs (by id) a poll found due and dealt with. Once every run announced
        in the last :data:`ALERT_SECONDS` is found, the polls that followed the
        announcements stop; one not due yet, or taken by another poller first, keeps
        them going until :data:`ALERT_SECONDS` after it was announced. An announcement
        heard within :data:`ALERT_SECONDS` after its run was found is ignored."""
        now = time.monotonic()
        for run_id in run_ids:
            self.unseen.pop(run_id, None)
            self.found_at[run_id] = now

    def _forget(self, now: float) -> None:
        """Forget the announcements and finds older than :data:`ALERT_SECONDS`."""
        horizon = now - ALERT_SECONDS
        self.unseen = {run_id: at for run_id, at in self.unseen.items() if at > horizon}
        self.found_at = {run_id: at for run_id, at in self.found_at.items() if at > horizon}

    def poll_due(self, also: bool = False) -> bool:
        """Return whether to ask the server for due runs now (and count it as asked):
        when ``also``, without a subscription, within :data:`ALERT_SECONDS` of a run of
        the pool announced and not yet :meth:`found` (or of a fresh subscription), once
        after a run of the pool ended (with ``ends``), and every ``idle_poll_seconds``
        otherwise."""
        now = time.monotonic()
        self._forget(now)
        alerted = bool(self.unseen) or now < self.blind_until
        due = (
            also
            or self.ended
            or not self.connected
            or alerted
            or now - self.polled_at >= self.idle_poll_seconds
        )
        if due:
            self.polled_at = now
            self.ended = False
        return due

    def close(self) -> None:
        """Close the subscription (polling goes on)."""
        if self.sock is not None:
            self.sock.close()
        self.sock = self.protocol = None
