"""The process's event loop for gRPC streams on `grpc.aio` (`store.watchstream`).

gRPC's synchronous client wakes every thread blocked reading a stream every 0.1 s (a
bound on how late a signal handler runs; no setting changes it), and each channel with a
stream open has a thread polling its completion queue every 0.2 s.  A process holding
many streams (an agent host, one watch per agent) pays that per stream while idle.
`grpc.aio` reads every stream of the process on one event loop, whose completion-queue
poller blocks without a timeout: an idle stream costs no wake-up.

One loop per process, started on first use, on a daemon thread.  Code on other threads
hands it work with `post` (never waiting for it while holding a lock the loop's
callbacks take); code on the loop never blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

__all__ = ["RequestQueue", "in_loop", "loop", "post", "run"]

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def loop() -> asyncio.AbstractEventLoop:
    """The process's loop (started now if it is not running)."""
    global _loop, _thread
    with _lock:
        if _loop is None or _thread is None or not _thread.is_alive():
            lp = asyncio.new_event_loop()
            t = threading.Thread(target=lp.run_forever, daemon=True, name="vmha-grpc-aio")
            t.start()
            _loop, _thread = lp, t
        return _loop


def in_loop() -> bool:
    return _thread is not None and threading.current_thread() is _thread


def post(fn: Callable[..., Any], *args: Any) -> None:
    """Run `fn(*args)` on the loop, soon, in the order posted."""
    loop().call_soon_threadsafe(fn, *args)


def run(coro: Coroutine[Any, Any, Any], timeout: float) -> bool:
    """Run `coro` on the loop; wait up to `timeout` s for it unless called on the loop.
    False: still running after `timeout` s (it goes on)."""
    fut = asyncio.run_coroutine_threadsafe(coro, loop())
    if in_loop():
        return False
    try:
        fut.result(timeout)
    except concurrent.futures.TimeoutError:
        return False
    return True


class RequestQueue:
    """The requests of one bidirectional stream, fed from the loop: `put` a request,
    `put(None)` to end the stream; `requests()` is the iterator the call reads.  Made,
    fed and read on the loop only."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    async def requests(self) -> AsyncIterator[Any]:
        while (req := await self._queue.get()) is not None:
            yield req

    def put(self, req: Any) -> None:
        self._queue.put_nowait(req)
