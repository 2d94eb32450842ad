"""Where the engine core runs, seen from the front end: a thread here, or its own process.

Both clients take the same commands and deliver the same events (core_messages.py) to a
callback on the front end's event loop:

    InprocClient  the core of an `LLMEngine` on a thread of this process (commands off a
                  queue, events via call_soon_threadsafe; nothing is encoded)
    MPClient      an engine-core process (core_proc.py) started from a forkserver, over two
                  ZeroMQ ipc sockets; its exit is watched through the process sentinel
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import zmq
import zmq.asyncio

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.engine.core_loop import CoreLoop
from pinnace.runtime.engine.core_messages import (
    Codec,
    Command,
    CoreDead,
    CoreReady,
    Event,
    Shutdown,
    StepOutputs,
    UtilityCall,
    UtilityResult,
    dumps,
    loads,
    updates_from_wire,
)
from pinnace.runtime.engine.llm_engine import LLMEngine
from pinnace.runtime.engine.step_profile import profile

logger = logging.getLogger(__name__)

EventHandler = Callable[[Event], None]


class CoreClient(Protocol):
    def start(self, loop: asyncio.AbstractEventLoop, on_event: EventHandler) -> None:
        """Begin delivering events to `on_event` on `loop`."""

    def send(self, command: Command) -> None: ...

    def call_sync(self, method: str, *args: Any) -> Any:
        """A utility call before `start` (e.g. adapters registered at start-up)."""

    def shutdown(self, timeout: float) -> None: ...

    @property
    def is_alive(self) -> bool: ...


class InprocClient:
    """The core of `engine` stepped by one thread of this process."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._dead = False

    def start(self, loop: asyncio.AbstractEventLoop, on_event: EventHandler) -> None:
        def deliver(event: Event) -> None:
            try:
                on_event(event)
            except Exception as exc:  # as MPClient: nobody would end the streams otherwise
                logger.exception("handling the engine core's event failed")
                self._dead = True
                on_event(CoreDead(_handler_failed(exc)))

        def emit(event: Event) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(deliver, event)

        self.engine.core.profile = profile("core")
        self._thread = threading.Thread(
            target=self._run, args=(CoreLoop(self.engine.core, emit),), name="pinnace-engine"
        )
        self._thread.daemon = True
        self._thread.start()

    def send(self, command: Command) -> None:
        self._inbox.put(command)

    def call_sync(self, method: str, *args: Any) -> Any:
        return getattr(self.engine.core, method)(*args)

    def shutdown(self, timeout: float) -> None:
        if self._thread is None:
            return
        self._inbox.put(Shutdown())
        self._thread.join(timeout)
        self._thread = None

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._dead

    def _run(self, loop: CoreLoop) -> None:
        try:
            while True:
                # Through the engine (not its core): tests inject faults there.
                busy = self.engine.has_unfinished_requests()
                # Idle: wait for a command (a moment only while a grammar compiles).
                wait = 0.0 if busy else 0.005 if loop.has_work else None
                handled = self._drain(loop, wait)
                if handled is None:
                    return
                loop.finish_background()
                if self.engine.has_unfinished_requests():
                    loop.step()
                elif handled:  # the commands left nothing to step: counters catch up
                    loop.report_idle()
        except BaseException as exc:  # a bug in the engine itself (tests inject one)
            logger.exception("engine thread died")
            self._dead = True
            loop.emit(CoreDead(repr(exc)))

    def _drain(self, loop: CoreLoop, wait: float | None) -> bool | None:
        """Apply the queued commands (waiting up to `wait` s for the first, None: as long as
        it takes); whether there were any, None on shutdown."""
        handled = False
        while True:
            try:
                command = self._inbox.get(block=wait != 0.0, timeout=wait)
            except queue.Empty:
                return handled
            wait, handled = 0.0, True
            if not loop.handle(command):
                return None


def _handler_failed(exc: BaseException) -> str:
    return f"the front end failed to handle the engine core's events: {exc!r}"


@contextlib.contextmanager
def _passive_openmp() -> Iterator[None]:
    """Start the core's process tree with OpenMP threads that sleep, not spin, at barriers
    (unless the user chose): the front end shares the cores with it, and under contention
    spinning teams stall each other. On a 2-core machine shared with other work, 16 steps
    of 8 requests (SmolLM2-135M shape) took 5-20 s spinning, 0.7 s passive. libgomp reads
    the variable once, when torch loads: it must be set when the forkserver starts.
    A quiet machine may gain from a short spin instead (GOMP_SPINCOUNT=N, libgomp's spin
    before sleeping; `hack/bench/serving.py --variant spin:GOMP_SPINCOUNT=20000` measures
    it): either variable set by the user is left alone."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        yield
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        yield
    finally:
        del os.environ["OMP_WAIT_POLICY"]


@contextlib.contextmanager
def _group_signals_ignored() -> Iterator[None]:
    """Start the core's process tree ignoring SIGINT and SIGTERM (inherited through the
    forkserver's exec and fork). The server owns the lifecycle: it drains on SIGTERM, then
    stops the core. A signal to the whole process group (Ctrl+C, `timeout`, an init that
    signals the group) would otherwise kill the forkserver and the core under a draining
    server, and a lost forkserver reads as a dead core (exit status 255): exit 1, streams cut."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be changed from the main thread
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class CoreStartError(RuntimeError):
    """The engine-core process could not load the model."""


def _start_error(dead: CoreDead) -> Exception:
    """The error a core that died before it was ready reports: the user's ValueError or
    FileNotFoundError as such (a bad flag: one line and exit 2 from the CLI), any other
    failure as a CoreStartError."""
    if dead.user_error == "FileNotFoundError":
        return FileNotFoundError(dead.reason)
    if dead.user_error is not None:
        return ValueError(dead.reason)
    return CoreStartError(f"the engine core failed to start: {dead.reason}")


class MPClient:
    """An engine-core process for `config`; `wait_ready` returns once its model is loaded."""

    def __init__(self, config: EngineConfig) -> None:
        self._dir = tempfile.mkdtemp(prefix="pinnace-core-")
        self._context = zmq.Context()
        self._codec = Codec()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_event: EventHandler | None = None
        try:
            self._start(config)
        except BaseException:  # nothing started: leave no sockets or folder behind
            self._close_sockets()
            raise

    def _start(self, config: EngineConfig) -> None:
        input_address = f"ipc://{self._dir}/input"
        output_address = f"ipc://{self._dir}/output"
        self._input = self._context.socket(zmq.PUSH)
        self._input.bind(input_address)
        self._output = self._context.socket(zmq.PULL)
        self._output.bind(output_address)
        # A forkserver forks a clean, preloaded process: quick, and safe in a parent that
        # already runs threads (uvicorn, OpenMP), which a plain fork is not.
        mp = multiprocessing.get_context("forkserver")
        # torch._dynamo too: building a model imports it lazily (a second per process).
        mp.set_forkserver_preload(["pinnace.runtime.engine.core_proc", "torch._dynamo"])
        from pinnace.runtime.engine.core_proc import run_engine_core

        self.process = mp.Process(
            target=run_engine_core,
            args=(config, input_address, output_address, os.getpid()),
            name="pinnace-engine-core",
            daemon=True,
        )
        with _passive_openmp(), _group_signals_ignored():
            self.process.start()

    def wait_ready(self, timeout: float | None = None) -> CoreReady:
        """Block until the core has loaded its model. Raises what stopped it: ValueError or
        FileNotFoundError for input the user can fix (a draft model path that does not
        exist, a backend this machine lacks), CoreStartError for anything else."""
        try:
            return self._wait_ready(timeout)
        except BaseException:
            self.shutdown(1.0)
            raise

    def _wait_ready(self, timeout: float | None) -> CoreReady:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._output.poll(100):
                event = self._codec.events.decode(self._output.recv())
                if isinstance(event, CoreReady):
                    return event
                if isinstance(event, CoreDead):
                    raise _start_error(event)
            elif not self.process.is_alive():
                raise CoreStartError(
                    f"the engine core exited with status {self.process.exitcode} at start-up."
                )
            if deadline is not None and time.monotonic() > deadline:
                raise CoreStartError(f"the engine core did not start within {timeout}s.")

    def start(self, loop: asyncio.AbstractEventLoop, on_event: EventHandler) -> None:
        self._loop, self._on_event = loop, on_event
        self._task = loop.create_task(self._read(zmq.asyncio.Socket.from_socket(self._output)))
        loop.add_reader(self.process.sentinel, self._on_exit)

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        decode = self._codec.events.decode
        prof = profile("frontend")
        try:
            while True:
                frame = await sock.recv(copy=False)
                start = time.perf_counter()
                event = decode(frame.buffer)
                if isinstance(event, StepOutputs):
                    event.updates = updates_from_wire(event.updates)
                    prof.add("step_start_to_frontend", time.monotonic() - event.step_start)
                prof.add("decode", time.perf_counter() - start)
                if self._on_event is not None:
                    self._on_event(event)
        except Exception as exc:
            # Nothing would read the core's events any more: every stream would wait
            # forever on a server that looks healthy. A dead reader is a dead core.
            if self._stopping:
                return
            logger.exception("reading the engine core's events failed")
            if self._on_event is not None:
                self._on_event(CoreDead(_handler_failed(exc)))

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, StepOutputs):
            event.updates = updates_from_wire(event.updates)
        if self._on_event is not None:
            self._on_event(event)

    def _on_exit(self) -> None:
        """The process ended (the sentinel fd is readable): deliver what it sent last, then
        its death unless we asked it to stop."""
        assert self._loop is not None
        self._loop.remove_reader(self.process.sentinel)
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(zmq.ZMQError):
            while self._output.poll(0):
                self._dispatch(self._codec.events.decode(self._output.recv()))
        self.process.join(1.0)
        if not self._stopping:
            code = self.process.exitcode
            self._dispatch(CoreDead(f"the engine core process exited (status {code})"))

    def send(self, command: Command) -> None:
        self._input.send(self._codec.encode(command), copy=False)

    def recv(self, timeout_ms: int) -> Event | None:
        """The core's next event read here, without an event loop (MPLLMEngine; not after
        `start`); None if none came within `timeout_ms`."""
        if not self._output.poll(timeout_ms):
            return None
        event: Event = self._codec.events.decode(self._output.recv())
        return event

    def call_sync(self, method: str, *args: Any) -> Any:
        self.send(UtilityCall(0, method, dumps(args)))
        while True:
            if not self._output.poll(100):
                if not self.process.is_alive():
                    raise CoreStartError("the engine core exited.")
                continue
            event = self._codec.events.decode(self._output.recv())
            if isinstance(event, UtilityResult) and event.call_id == 0:
                result = loads(event.result)
                if event.failed:
                    raise result
                return result

    @property
    def is_alive(self) -> bool:
        return self.process.is_alive() and not self._stopping

    def shutdown(self, timeout: float) -> None:
        """Tell the core to stop (its requests are aborted), then make sure it has."""
        if self._stopping:
            return
        self._stopping = True
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.process.sentinel)
        if self._task is not None:
            self._task.cancel()
        if self.process.is_alive():
            with contextlib.suppress(zmq.ZMQError):
                self._input.send(self._codec.encode(Shutdown()), zmq.NOBLOCK)
            self.process.join(timeout)
        if self.process.is_alive():
            logger.warning("the engine core did not stop in %gs: killing it", timeout)
            self.process.kill()
            self.process.join(5.0)
        self._close_sockets()

    def _close_sockets(self) -> None:
        for name in ("_input", "_output"):
            sock: zmq.Socket[bytes] | None = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)
        self._context.term()
        shutil.rmtree(self._dir, ignore_errors=True)
