"""The engine core's transport under CPU contention: ZeroMQ ipc vs a plain AF_UNIX socketpair.

A child process plays the core: torch GEMMs on 2 threads, and one small message (~2 KB) per
~30 ms "step". The parent plays the front end: an asyncio loop reading the messages. Per
transport and round: the wall and CPU time of the child's send, and the latency from send
to the parent's loop seeing the message. Transports alternate in rounds.

    hack/bench/core_transport.py --rounds 3 --messages 100

The core keeps ZeroMQ: a socketpair transport (commit 5f494b3, reverted) made the core's
send cheaper in `serving.py --profile` (p50 0.036 vs 0.05 ms) but, with 48 requests at
once, raised TTFT p50 from ~215 to ~300 ms (6 alternating rounds, load ~1 on 2 cores) at
equal tokens/s. pyzmq is a dependency of the server, so both transports are measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import struct
import tempfile
import time

from bench_common import summary

HEADER = struct.Struct("!I")
PAYLOAD = 2048


def _core(kind: str, where: str | int, messages: int, out: multiprocessing.queues.Queue) -> None:
    import torch

    torch.set_num_threads(2)
    a = torch.randn(512, 512)
    if kind == "zmq":
        import zmq

        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.connect(str(where))

        def send(data: bytes) -> None:
            sock.send(data, copy=False)
    else:
        conn = socket.socket(fileno=int(where))
        conn.setblocking(True)

        def send(data: bytes) -> None:
            conn.sendall(HEADER.pack(len(data)) + data)

    walls, cpus = [], []
    for _ in range(messages):
        end = time.monotonic() + 0.03
        while time.monotonic() < end:
            a = torch.tanh(a @ a)
        data = struct.pack("!d", time.monotonic()) + bytes(PAYLOAD)
        cpu, wall = time.thread_time(), time.perf_counter()
        send(data)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.thread_time() - cpu)
    out.put((walls, cpus))
    time.sleep(0.2)


async def _front_zmq(address: str, messages: int) -> list[float]:
    import zmq
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind(address)
    lat = []
    ready.set()
    for _ in range(messages):
        frame = await sock.recv()
        lat.append(time.monotonic() - struct.unpack_from("!d", frame)[0])
    sock.close(0)
    ctx.term()
    return lat


async def _front_unix(sock: socket.socket, messages: int) -> list[float]:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    lat: list[float] = []
    buf = bytearray()
    done = loop.create_future()

    def readable() -> None:
        buf.extend(sock.recv(1 << 16))
        while len(buf) >= HEADER.size:
            (n,) = HEADER.unpack_from(buf)
            if len(buf) < HEADER.size + n:
                break
            frame = bytes(buf[HEADER.size : HEADER.size + n])
            del buf[: HEADER.size + n]
            lat.append(time.monotonic() - struct.unpack_from("!d", frame)[0])
        if len(lat) >= messages and not done.done():
            done.set_result(None)

    loop.add_reader(sock.fileno(), readable)
    ready.set()
    await done
    loop.remove_reader(sock.fileno())
    return lat


ready: asyncio.Event


def run(kind: str, messages: int) -> dict[str, float]:
    global ready
    mp = multiprocessing.get_context("spawn")
    out = mp.Queue()

    async def main() -> list[float]:
        global ready
        ready = asyncio.Event()
        if kind == "zmq":
            address = f"ipc://{tempfile.mkdtemp()}/out"
            task = asyncio.ensure_future(_front_zmq(address, messages))
            await ready.wait()
            proc = mp.Process(target=_core, args=(kind, address, messages, out))
            proc.start()
        else:
            front, core = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            task = asyncio.ensure_future(_front_unix(front, messages))
            await ready.wait()
            proc = mp.Process(target=_core, args=(kind, core.fileno(), messages, out))
            proc.start()  # spawn: pass the fd
            core.close()
        lat = await task
        proc.join()
        return lat

    if kind != "zmq":
        # spawn cannot inherit an arbitrary fd: use fork-less passing via multiprocessing's
        # reduction is heavy; fork is fine here (nothing threaded yet in the parent).
        mp = multiprocessing.get_context("fork")
        out = mp.Queue()
    lat = asyncio.run(main())
    walls, cpus = out.get()
    ms = 1000.0
    return {
        "send_wall_ms_mean": statistics.mean(walls) * ms,
        "send_wall_ms_p99": sorted(walls)[int(0.99 * len(walls))] * ms,
        "send_cpu_ms_mean": statistics.mean(cpus) * ms,
        "latency_ms_p50": statistics.median(lat) * ms,
        "latency_ms_p99": sorted(lat)[int(0.99 * len(lat))] * ms,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--messages", type=int, default=100)
    args = p.parse_args()
    kinds = ("zmq", "unix")
    results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            results[kind].append(run(kind, args.messages))
    report: dict[str, object] = {
        kind: {key: summary([r[key] for r in rs], 3) for key in rs[0]}
        for kind, rs in results.items()
    }
    report["note"] = f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
