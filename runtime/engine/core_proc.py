"""The engine-core process: load the model, then command -> step -> outputs, forever.

    front end (server process)                 engine core (this module)
    --------------------------                 -------------------------
    PUSH ipc://.../input  ── commands ──────>  PULL: drained between steps
    PULL ipc://.../output <── events ───────── PUSH: CoreReady, then a StepOutputs per
                                               step (and call results, failures)

Nothing but the engine runs here, so a step never waits for HTTP work on the GIL. The
process ignores SIGINT (Ctrl-C reaches the whole process group: the front end drains and
then sends Shutdown), exits when told, and exits by itself if the front end's process is
gone. An error that escapes the loop is sent as CoreDead, and the process exits 1.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from collections.abc import Callable

import torch
import zmq

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.distributed.parallel_state import RendezvousError
from pinnace.runtime.engine.core_loop import CoreLoop
from pinnace.runtime.engine.core_messages import (
    Codec,
    CoreDead,
    CoreReady,
    Event,
    StepOutputs,
    dumps,
    updates_to_wire,
)
from pinnace.runtime.engine.engine_core import EngineCore
from pinnace.runtime.engine.startup_heap import freeze_startup_heap
from pinnace.runtime.engine.step_profile import NullProfile, profile

logger = logging.getLogger("pinnace.runtime")

IDLE_POLL_MS = 1000  # how often an idle core checks that its front end is still there
COMPILE_POLL_MS = 5  # an idle core waiting for a grammar looks this often
SEND_TIMEOUT_MS = 1000  # a send that waits this long checks it too
LIVENESS_CHECK_S = 1.0  # and a busy core, between steps
USER_ERROR_EXIT = 2  # the exit status of a core that could not start from bad input


class FrontEndGone(Exception):
    """The process that started this core is gone: nobody is left to serve."""


def run_engine_core(
    config: EngineConfig, input_address: str, output_address: str, front_end_pid: int
) -> None:
    """The process's target: serve until Shutdown; exit status 1 on any failure."""
    # The server owns the lifecycle: on SIGTERM it drains, then sends Shutdown (and the core
    # exits by itself if the server is gone). A signal to the whole process group (Ctrl+C,
    # `timeout`, an init that signals the group) must not kill the core under a draining
    # server, which would turn a clean stop into an engine death and exit status 1.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s (core): %(message)s"
    )
    context = zmq.Context()
    commands = context.socket(zmq.PULL)
    commands.connect(input_address)
    events = context.socket(zmq.PUSH)
    events.connect(output_address)
    codec = Codec()

    events.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    prof = profile("core")

    def emit(event: Event) -> None:
        prof.start()
        if isinstance(event, StepOutputs):
            event.updates = updates_to_wire(event.updates)
        data = codec.encode(event)
        prof.lap("encode")
        cpu = time.thread_time() if prof.enabled else 0.0
        while True:  # blocks only when the front end is far behind, or gone
            try:
                events.send(data, copy=False)
                if prof.enabled:  # send >> send_cpu: the thread lost its core meanwhile
                    prof.add("send_cpu", time.thread_time() - cpu)
                prof.lap("send")
                return
            except zmq.Again:
                if not _alive(front_end_pid):
                    raise FrontEndGone(front_end_pid) from None

    core: EngineCore | None = None
    try:
        try:
            core = EngineCore(config)
        except (ValueError, FileNotFoundError, RendezvousError) as exc:
            # The user's to fix (a bad flag, a missing path, nodes started with other
            # layouts or not at all): one line, no traceback.
            emit(CoreDead(str(exc), type(exc).__name__))
            events.close(linger=1000)
            sys.exit(USER_ERROR_EXIT)
        core.profile = prof
        logger.info(
            "engine core ready (pid %d, %d torch threads)", os.getpid(), torch.get_num_threads()
        )
        facts = dumps((core.tokenizer, core.model_config, sorted(core.eos_token_ids)))
        freeze_startup_heap("engine core")
        emit(CoreReady(core.max_model_len, core.parts.num_blocks, core.runner_type, facts))
        _serve(CoreLoop(core, emit), commands, codec, front_end_pid, prof, core.check_health)
        core.shutdown()  # the worker ranks, if any
    except SystemExit:
        raise
    except FrontEndGone as gone:
        logger.warning("the front end (pid %s) is gone: stopping", gone)
        if core is not None:  # not an orderly close: other nodes exit non-zero
            core.executor.abandon(f"the front end (pid {gone}) is gone")
        events.close(linger=0)
        return
    except BaseException as exc:
        logger.exception("the engine core failed")
        emit(CoreDead(repr(exc)))
        events.close(linger=1000)  # let the last word reach the front end
        sys.exit(1)
    finally:
        prof.dump()  # a multiprocessing child leaves by os._exit: no atexit
    events.close(linger=1000)
    commands.close(linger=0)


def _serve(
    loop: CoreLoop,
    commands: zmq.Socket[bytes],
    codec: Codec,
    front_end_pid: int,
    prof: NullProfile,
    check_health: Callable[[], None] = lambda: None,
) -> None:
    poller = zmq.Poller()
    poller.register(commands, zmq.POLLIN)
    checked = time.monotonic()
    while True:
        busy = loop.core.has_unfinished_requests()
        # Idle: sleep until a command comes (or, while a grammar compiles, a moment); busy:
        # only take what is already there.
        prof.start()
        ready = poller.poll(0 if busy else COMPILE_POLL_MS if loop.has_work else IDLE_POLL_MS)
        prof.lap("poll" if busy else "poll_idle")
        # Every second or so: is anyone left to serve? (A killed server leaves no word.)
        if (not ready or busy) and time.monotonic() - checked > LIVENESS_CHECK_S:
            checked = time.monotonic()
            if not _alive(front_end_pid):
                raise FrontEndGone(front_end_pid)
            check_health()  # a dead model rank: fail now (CoreDead, exit 1)
        handled = False
        while True:
            try:
                data = commands.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            handled = True
            if not loop.handle(codec.commands.decode(data.buffer)):
                return
        if handled:
            prof.lap("commands")
        loop.finish_background()
        if loop.core.has_unfinished_requests():
            loop.step()
        elif handled:
            loop.report_idle()


def _alive(pid: int) -> bool:
    """Whether the front end still runs: its end of the pipe multiprocessing keeps to every
    child closes when it dies (zombie or not); the pid check covers any other start."""
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid == pid and parent.sentinel is not None:
        return not multiprocessing.connection.wait([parent.sentinel], timeout=0)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
