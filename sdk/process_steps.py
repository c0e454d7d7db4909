"""Running a step's plain function in a child process, which a cancel can stop.

Python cannot stop a thread, but it can stop a process. ``ctx.step.run(name, fn,
process=True)`` runs ``fn`` in a child process; on cancel the child gets SIGTERM, then
SIGKILL once the worker's ``thread_grace`` has passed, and the step raises the run's
cancellation. Whatever ``fn`` is doing (a CPU loop, C code, ``time.sleep``), it stops.

Children come from the ``forkserver`` start method: a fork of a small server process that
holds no threads, no event loop and no Redis connection, which forking the worker itself
would copy in an unsafe state. The first process step of a worker starts that server.

No child outlives its step: it is stopped when the step ends in any way (a cancel, the
worker stopping, the run's scope cancelled from outside), each child leads its own process
group so that what it started goes with it, and a child whose worker died (SIGKILL, the
OOM killer) kills itself: it holds the read end of a pipe only the worker can write to,
and a thread of its own waits for that pipe's end of file.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext, SpawnContext
from typing import Any, Final

import anyio

from sdk.errors import NotPicklableError, ProcessStepCrashed, ProcessStepError

_CONTEXT: Final[ForkServerContext | SpawnContext] = (
    multiprocessing.get_context("forkserver")
    if "forkserver" in multiprocessing.get_all_start_methods()
    else multiprocessing.get_context("spawn")  # Windows: slower, as safe
)
#: Safe with the worker's threads and event loop (see the module docstring).
START_METHOD: Final = _CONTEXT.get_start_method()
if START_METHOD == "forkserver":
    # Imported once in the fork server, so that a child starts with them loaded.
    _CONTEXT.set_forkserver_preload(["__main__", __name__])


def pickled_call(step: str, fn: Callable[..., Any], args: Any, kwargs: dict[str, Any]) -> bytes:
    """The call as bytes for the child, or a clear error naming what cannot cross."""
    try:
        return pickle.dumps((step, fn, args, kwargs))
    except Exception as exc:
        raise NotPicklableError(
            f"step {step!r} runs in a process, so its function and arguments must be"
            f" picklable (a module-level function, not a lambda, closure or bound method of"
            f" an unpicklable object): {exc}"
        ) from exc


async def run_in_process(step: str, payload: bytes, *, grace: float) -> Any:
    """The call ``payload`` (from :func:`pickled_call`) in a child process; on cancel,
    SIGTERM, then SIGKILL."""
    reader, writer = _CONTEXT.Pipe(duplex=False)
    lifeline, lifeline_end = _CONTEXT.Pipe(duplex=False)
    process = _CONTEXT.Process(target=_child, args=(payload, writer, lifeline), name=f"step {step}")
    try:
        with anyio.CancelScope(shield=True):  # a half-started child would escape the stop
            await anyio.to_thread.run_sync(process.start)
        writer.close()  # the child's copy is the one left: EOF when it dies
        lifeline.close()
        try:
            answer = await _answer(reader)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stop(process, grace)
            raise
    finally:
        writer.close()
        lifeline.close()
        reader.close()
        if process.pid is not None and process.exitcode is None:
            with anyio.CancelScope(shield=True):
                await stop(process, 0)
        lifeline_end.close()
    if answer is None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(process.join)
        raise ProcessStepCrashed(step, process.exitcode if process.exitcode is not None else 0)
    process.join()  # it answered, then exited (its sentinel is closed by now, or soon)
    return _outcome(step, answer)


async def stop(process: multiprocessing.process.BaseProcess, grace: float) -> None:
    """SIGTERM to the child's group, up to ``grace`` s to exit, then SIGKILL; reaped."""
    if grace > 0:
        _signal_group(process, signal.SIGTERM)
        with anyio.move_on_after(grace):
            await anyio.wait_readable(process.sentinel)
    if process.exitcode is None:
        _signal_group(process, signal.SIGKILL)
    await anyio.to_thread.run_sync(process.join)
    # What the child left in its group (a subprocess it started) goes with it.
    _signal_group(process, signal.SIGKILL)


def _signal_group(process: multiprocessing.process.BaseProcess, signum: int) -> None:
    pid = process.pid
    if pid is None:
        return
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        # Not its own group yet (signalled before its first line ran), or the group is
        # gone: the process itself, if it is still there.
        if process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


async def _answer(reader: Connection) -> bytes | None:
    """The child's pickled answer, or ``None`` if it died without one."""
    await anyio.wait_readable(reader.fileno())
    try:
        # Readable: a message is arriving (or EOF); a large one may take a moment more.
        return await anyio.to_thread.run_sync(reader.recv_bytes)
    except EOFError:
        return None


def _outcome(step: str, answer: bytes) -> Any:
    try:
        kind, value = pickle.loads(answer)
    except Exception as exc:
        raise ProcessStepError(
            f"the answer of step {step!r}'s process cannot be unpickled here: {exc!r}"
        ) from exc
    if kind == "ok":
        return value
    if kind == "unpicklable":
        raise NotPicklableError(value)
    raise value


def _child(payload: bytes, writer: Connection, lifeline: Connection) -> None:
    """The child's whole life: run the call, send back its result or its exception."""
    os.setpgid(0, 0)  # its own group, so that stopping it stops what it started
    threading.Thread(target=_die_with_worker, args=(lifeline,), daemon=True).start()
    step, fn, args, kwargs = pickle.loads(payload)
    answer: tuple[str, Any]
    try:
        answer = ("ok", fn(*args, **kwargs))
    except Exception as exc:
        exc.add_note(f"in the process of step {step!r}:\n{traceback.format_exc()}")
        answer = ("error", exc)
    except BaseException as exc:  # SystemExit, KeyboardInterrupt: not for the worker to raise
        answer = ("error", ProcessStepError(f"the process of step {step!r} raised {exc!r}"))
    try:
        data = pickle.dumps(answer)
    except Exception as exc:
        if answer[0] == "ok":
            message = f"the result of step {step!r} cannot be pickled: {exc}"
            data = pickle.dumps(("unpicklable", message))
        else:
            error = ProcessStepError(
                f"step {step!r} raised {answer[1]!r}, which cannot be pickled:\n"
                f"{''.join(traceback.format_exception(answer[1]))}"
            )
            data = pickle.dumps(("error", error))
    writer.send_bytes(data)
    writer.close()


def _die_with_worker(lifeline: Connection) -> None:
    """Block until the worker's end of the lifeline closes, then kill the child's group."""
    with contextlib.suppress(EOFError, OSError):
        while True:
            lifeline.recv_bytes()
    os.killpg(0, signal.SIGKILL)
