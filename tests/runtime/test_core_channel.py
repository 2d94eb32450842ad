"""The front end <-> core channel: frames survive partial reads, large frames, both
directions at once, and the event loop; the other end's exit is seen."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pinnace.runtime.engine.core_channel import Channel, ChannelClosed, channel_pair


def recv(channel: Channel, timeout: float = 5.0) -> bytes | None:
    """The next whole frame (a poll may return with only part of one read)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if channel.poll(0.1):
            return channel.recv_nowait()
    return None


def test_frames_arrive_whole_and_in_order_both_ways_at_once() -> None:
    ours, sock = channel_pair()
    theirs = Channel(sock)
    big = bytes(range(256)) * 8192  # 2 MiB: far more than the socket buffer
    frames = [b"", b"x", big, b"tail"]

    # Both sides send more than the kernel buffers before reading: a blocking send keeps
    # what arrives meanwhile, so neither waits on the other forever.
    def other_side() -> None:
        for frame in frames:
            theirs.send(frame)

    thread = threading.Thread(target=other_side)
    thread.start()
    for frame in frames:
        ours.send(frame[::-1])
    got = [recv(ours) for _ in frames]
    thread.join(5)
    assert got == frames
    assert [recv(theirs) for _ in frames] == [f[::-1] for f in frames]
    assert ours.recv_nowait() is None

    theirs.close()
    with pytest.raises(ChannelClosed):
        ours.poll(1.0)
    ours.close()


def test_attached_channel_delivers_on_the_loop_and_buffers_writes() -> None:
    ours, sock = channel_pair()
    theirs = Channel(sock)
    theirs.send(b"before")  # read while waiting, delivered once attached
    assert ours.poll(1.0)

    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        got: list[bytes] = []
        done = asyncio.Event()

        def on_frame(frame: bytes) -> None:
            got.append(frame)
            if frame == b"after":
                done.set()

        ours.attach(loop, on_frame)
        big = b"y" * (4 << 20)
        ours.send(big)  # never blocks the loop: what the socket refuses waits for it
        received = await loop.run_in_executor(None, recv, theirs)
        assert received == big
        theirs.send(b"after")
        await asyncio.wait_for(done.wait(), 5)
        ours.detach()
        return got

    assert asyncio.run(main()) == [b"before", b"after"]
    ours.close()
    theirs.close()
