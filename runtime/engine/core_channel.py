"""The front end <-> engine-core channel: length-prefixed frames over a local stream socket.

One AF_UNIX socketpair carries both directions (commands to the core, events back). A
frame is a 4-byte big-endian length, then that many bytes (one msgpack message). The
socket stays non-blocking; each side chooses how to wait:

    core       `send` blocks until the frame is written (frames are small; the kernel
               buffer absorbs them), `poll` + `recv_nowait` between steps
    front end  before its event loop runs: the same blocking calls (reading what arrives
               while a send waits, so neither side can block the other); then `attach`:
               reads and writes are driven by the loop's add_reader/add_writer

Why not ZeroMQ: every zmq send wakes zmq's own I/O thread. Under CPU contention (2 cores,
the core's torch threads on both) that wake-up cost the core its slice: a send took ~5 ms
of wall time for 0.07 ms of CPU (the core profile's `send` vs `send_cpu`). A plain socket
write is one syscall on the sending thread (hack/bench/core_transport.py compares both).
"""

from __future__ import annotations

import asyncio
import collections
import select
import socket
import struct
from collections.abc import Callable

HEADER = struct.Struct("!I")
READ_SIZE = 1 << 18


class ChannelClosed(ConnectionError):
    """The other end closed the channel (its process is gone)."""


def channel_pair() -> tuple[Channel, socket.socket]:
    """This process's channel, and the other end's raw socket (to hand to a child)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Channel(ours), theirs


class Channel:
    """Frames over `sock` (an AF_UNIX stream socket)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._inbuf = bytearray()
        self._frames: collections.deque[bytes] = collections.deque()
        self._outbuf = bytearray()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writing = False
        self.closed_by_peer = False

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- blocking use (the core; the front end before `attach`) --------------------------

    def send(self, data: bytes | memoryview, on_wait: Callable[[], None] | None = None) -> None:
        """Write one frame. Attached: buffer what the socket does not take now (the loop
        writes it). Otherwise block until written, calling `on_wait` every second it waits
        (it may raise to give up) and keeping what arrives meanwhile for `recv_nowait`."""
        frame = HEADER.pack(len(data)) + data
        if self._loop is not None:
            if self._outbuf:
                self._outbuf += frame
                return
            try:
                sent = self._send_some(frame)
            except OSError:  # the core is gone: its process sentinel reports it
                return
            if sent < len(frame):
                self._outbuf += frame[sent:]
                self._loop.add_writer(self.sock.fileno(), self._flush)
                self._writing = True
            return
        view = memoryview(frame)
        while view:
            view = view[self._send_some(view) :]
            if view:
                readable, writable, _ = select.select([self.sock], [self.sock], [], 1.0)
                if readable:
                    self._read_available()
                if not readable and not writable and on_wait is not None:
                    on_wait()

    def poll(self, timeout: float) -> bool:
        """Whether a frame is ready, waiting up to `timeout` s for one. Raises
        ChannelClosed once the other end is gone and every frame has been taken."""
        if self._frames:
            return True
        if timeout > 0:
            select.select([self.sock], [], [], timeout)
        self._read_available()
        if not self._frames and self.closed_by_peer:
            raise ChannelClosed("the other end closed the channel")
        return bool(self._frames)

    def recv_nowait(self) -> bytes | None:
        """The next frame if one has arrived, else None."""
        if not self._frames:
            self._read_available()
        return self._frames.popleft() if self._frames else None

    # -- event-loop use (the front end once its loop runs) -------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop, on_frame: Callable[[bytes], None]) -> None:
        """Deliver every frame to `on_frame` on `loop` (first those already read)."""
        self._loop = loop

        def readable() -> None:
            self._read_available()
            while self._frames:
                on_frame(self._frames.popleft())
            if self.closed_by_peer:  # the process sentinel reports the death
                loop.remove_reader(self.sock.fileno())

        loop.add_reader(self.sock.fileno(), readable)
        if self._frames:
            loop.call_soon(readable)

    def detach(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self.sock.fileno())
            if self._writing:
                loop.remove_writer(self.sock.fileno())
        self._writing = False

    def drain(self) -> list[bytes]:
        """Every frame already sent to this end (after the other end is gone)."""
        self._read_available()
        frames = list(self._frames)
        self._frames.clear()
        return frames

    def close(self) -> None:
        self.detach()
        self.sock.close()

    # -- internals ------------------------------------------------------------------------

    def _send_some(self, data: bytes | bytearray | memoryview) -> int:
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0

    def _flush(self) -> None:
        try:
            sent = self._send_some(self._outbuf)
        except OSError:  # the core is gone: its sentinel reports it
            sent = len(self._outbuf)
        del self._outbuf[:sent]
        if not self._outbuf and self._loop is not None:
            self._loop.remove_writer(self.sock.fileno())
            self._writing = False

    def _read_available(self) -> None:
        if self.closed_by_peer:
            return
        while True:
            try:
                chunk = self.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed_by_peer = True
                break
            self._inbuf += chunk
            if len(chunk) < READ_SIZE:
                break
        buf, start = self._inbuf, 0
        while len(buf) - start >= HEADER.size:
            (size,) = HEADER.unpack_from(buf, start)
            end = start + HEADER.size + size
            if end > len(buf):
                break
            self._frames.append(bytes(buf[start + HEADER.size : end]))
            start = end
        if start:
            del buf[:start]
