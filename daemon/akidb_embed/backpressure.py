"""What one client connection may cost the daemon, and the replies it drops.

Each connection to a ROUTER holds two ZeroMQ pipes; their high-water marks bound what they
queue in the daemon: ``REPLY_HWM`` replies not yet taken by the kernel (a client that never
reads), ``REQUEST_HWM`` requests not yet read by the loop. With ``ROUTER_MANDATORY`` a reply
that does not fit raises instead of vanishing, so ``ReplyGate`` can count it by cause
(``peer_gone``: the client disconnected; ``not_reading``: its reply queue stayed full for
``GRACE_MS``) and mute the peer: a muted peer's requests are not run but answered ``overloaded``
at once, and the first such answer its queue takes again unmutes it. A client that floods
without reading thus costs a decode per request, not inference that would delay everybody else.
"""

from __future__ import annotations

import logging
import resource
from collections import OrderedDict

import zmq
from akidb_embed_client.errors import Overloaded

from .settings import Limits

log = logging.getLogger(__name__)

# Unread replies queued per connection: the daemon holds at most this many replies of a client
# that does not read (a reading client's own ZeroMQ thread takes replies as they come, so these
# fill only when it stops reading). An embed reply is at most max_texts x dim x 4 bytes.
REPLY_HWM = 16
# Requests per connection that ZeroMQ reads ahead of the loop; past that it stops reading the
# connection, so the client's sends block instead of the daemon's memory growing.
REQUEST_HWM = 16
# A reply that finds its connection's queue full waits this long for ZeroMQ's I/O thread to drain
# it before it is dropped: a burst of quick replies (a pipelining client's requests refused at
# once, say) can outrun that thread for a moment while the client reads. The loop waits then, once
# per peer until it is muted; a muted peer's replies never wait.
GRACE_MS = 100
# Past this a frame is refused by ZeroMQ itself (the peer is disconnected, no reply):
# a safety net against memory exhaustion far above the byte limit that gets a clear error.
HARD_FRAME_FACTOR = 16
# Peers remembered as not reading; the oldest is forgotten first (a gone peer's routing id never
# returns, and a forgotten one that still does not read is muted again by its next reply).
MAX_MUTED = 1024
PEER_GONE, NOT_READING = "peer_gone", "not_reading"


def configure_router(socket: zmq.Socket, limits: Limits) -> None:
    """Bound what each connection of a ROUTER can cost; call before ``bind`` (options apply to new pipes)."""
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.MAXMSGSIZE, limits.max_request_bytes * HARD_FRAME_FACTOR)
    socket.setsockopt(zmq.SNDHWM, REPLY_HWM)
    socket.setsockopt(zmq.RCVHWM, REQUEST_HWM)
    socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
    socket.setsockopt(zmq.SNDTIMEO, GRACE_MS)  # for the one blocking retry of a reply that found the queue full


def raise_descriptor_limit() -> int:
    """Raise the soft limit on open descriptors to the hard one; the limit now.

    Each client connection holds a descriptor, and libzmq aborts the process when accepting one
    fails for want of descriptors (EMFILE is not among the errors its ipc listener tolerates):
    under systemd's default soft limit of 1024, a client opening a thousand connections would end
    the daemon. At the hard limit (524288 under systemd), connections run into the memory they
    cost (about 30 KiB each, measured) long before.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class ReplyGate:
    """Sends replies without ever blocking; counts those dropped and mutes the peers that do not read."""

    def __init__(self) -> None:
        self.dropped = {PEER_GONE: 0, NOT_READING: 0}
        # By socket and identity: each tenant's ROUTER numbers its peers alike.
        self._muted: OrderedDict[tuple[zmq.Socket, bytes], None] = OrderedDict()

    def check(self, socket: zmq.Socket, envelope: list[bytes]) -> None:
        """Overloaded if the requesting peer left its earlier replies unread: its request must not be run."""
        if (socket, envelope[0]) in self._muted:
            raise Overloaded(
                f"this connection left {REPLY_HWM} replies unread, so its requests are not run: read the replies "
                "of the requests you send, then send again"
            )

    def send(self, socket: zmq.Socket, envelope: list[bytes], frames: list) -> None:
        """Queue one reply; a reply to a gone peer, or to a full queue, is dropped and counted."""
        peer = (socket, envelope[0])
        try:
            self._queue(socket, peer, envelope + frames)
        except zmq.Again:
            self._drop(NOT_READING)
            self._muted[peer] = None
            self._muted.move_to_end(peer)
            if len(self._muted) > MAX_MUTED:
                self._muted.popitem(last=False)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer disconnected (a client that timed out, say)
            self._drop(PEER_GONE, exc)
            self._muted.pop(peer, None)
        else:
            self._muted.pop(peer, None)

    def _queue(self, socket: zmq.Socket, peer: tuple[zmq.Socket, bytes], message: list) -> None:
        """Queue without waiting; a full queue of a peer not muted gets GRACE_MS to drain (zmq.Again if not)."""
        try:
            socket.send_multipart(message, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if peer in self._muted:
                raise
            socket.send_multipart(message, copy=False)  # blocks for SNDTIMEO at most

    def describe(self) -> dict[str, object]:
        """For ``status``: replies dropped by cause, and the peers muted now."""
        return {"dropped_replies": dict(self.dropped), "muted_peers": len(self._muted)}

    def _drop(self, cause: str, exc: Exception | None = None) -> None:
        self.dropped[cause] += 1
        count = self.dropped[cause]
        if count & (count - 1) == 0:  # 1, 2, 4, 8...: a flood cannot flood the journal
            log.warning("reply dropped (%s%s); %d dropped so far for this cause", cause, f": {exc}" if exc else "", count)
