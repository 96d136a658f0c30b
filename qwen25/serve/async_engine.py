"""Run the token-level Engine in one background thread and hand each request's output to asyncio as text.

All engine calls (submit, cancel, step) happen on that thread, so the Engine needs no locks: HTTP handlers put
commands into a thread-safe inbox and read their events from an asyncio.Queue that the thread fills with
`loop.call_soon_threadsafe`. Each request's TextTracker (generation/stops.py) detokenises and finds stop strings;
the engine consults it after every token (Request.should_stop), so a stop string ends generation at the step
that completes it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..generation import Engine, Request, TextTracker
from ..generation.engine import TokenLogprob

log = logging.getLogger("qwen25.serve")


@dataclass
class Event:
    """Output of one request: `text` released since the last event, tokens generated in total so far, and
    finish_reason (stop/length/cancelled/error) on the last event."""

    index: int
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    status: int = 400  # with error: 400 the request was refused, 500 generation failed, 503 shutting down
    logprobs: list[tuple[int, TokenLogprob]] = field(default_factory=list)  # tokens generated since the last event
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first event, when asked for


class _Handle:
    """A request on its way through the engine thread: its choice index, its text so far, and where events go."""

    def __init__(self, rid: str, index: int, request: Request, tokenizer, sink):
        if not isinstance(request.should_stop, TextTracker):  # the text is read off the request's tracker
            request.should_stop = TextTracker(tokenizer, [])
        request.id = rid
        self.id, self.index, self.request, self.sink = rid, index, request, sink
        self.tracker = request.should_stop
        self.tokens = 0
        self.logprobs: list[tuple[int, TokenLogprob]] = []  # not sent yet
        self.prompt_logprobs = None

    def emit(self, event: Event) -> None:
        event.logprobs, self.logprobs = self.logprobs, []
        event.prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, None
        self.sink(event)


class ThroughputMeter:
    """Generated tokens per second over a sliding window (for /metrics)."""

    def __init__(self, window_s: float = 10.0):
        self.window, self.points = window_s, deque()

    def add(self, count: int, now: float | None = None) -> None:
        self.points.append((now if now is not None else time.monotonic(), count))

    def rate(self, now: float | None = None) -> float:
        now = now if now is not None else time.monotonic()
        while self.points and self.points[0][0] < now - self.window:
            self.points.popleft()
        if not self.points:
            return 0.0
        # Tokens in the window over the time they span (at least a second, so one burst does not read as a spike).
        return sum(c for _, c in self.points) / max(now - self.points[0][0], 1.0)


class AsyncEngine:
    """The Engine on a background thread, with an async interface: `async for event in stream(requests)`."""

    def __init__(self, engine: Engine, tokenizer, idle_poll_s: float = 0.1, own_thread: bool = True):
        self.engine, self.tokenizer, self.idle_poll_s = engine, tokenizer, idle_poll_s
        # own_thread=False: the caller drives the loop with run() (`qwen25 serve` does, on its main thread: with
        # OpenMP (torch's CPU kernels and ours) a second thread's parallel regions start ~3x slower once the main
        # thread has used OpenMP too, because libgomp stops its workers from spinning between regions)
        self.own_thread = own_thread
        self.inbox: queue.Queue = queue.Queue()
        self.handles: dict[str, _Handle] = {}
        self.counters = {"generated_tokens": 0, "finished": 0, "cancelled": 0, "errors": 0, "steps": 0}
        self.throughput = ThroughputMeter()
        self.pending = 0  # submitted by handlers, not yet taken by the engine thread (both threads change it)
        self._pending_lock = threading.Lock()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (idempotent; nothing to do when the caller drives the loop with run())."""
        if self.own_thread and (self._thread is None or not self._thread.is_alive()):
            self._thread = threading.Thread(target=self._loop, name="qwen25-engine", daemon=True)
            self._thread.start()

    def run(self) -> None:
        """Drive the engine in the calling thread until stop() (for own_thread=False); requests still running at
        the end get an error event."""
        if self.own_thread:
            raise RuntimeError("this engine runs its own thread (own_thread=True); start() it instead")
        self._thread = threading.current_thread()
        try:
            self._loop()
        finally:
            self._fail_all("the server is shutting down", 503)
            self._thread = None

    def stop(self) -> None:
        """Stop the engine thread (or the run() loop); requests still running end with an error event."""
        if not self.own_thread:
            self.inbox.put(("stop", None))
        elif self._thread is not None:
            self.inbox.put(("stop", None))
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_length(self) -> int:
        """Requests waiting for a slot (not yet prefilled)."""
        return self.pending + len(self.engine.waiting)

    @property
    def running(self) -> int:
        return len(self.engine.running)

    @property
    def max_len(self) -> int:
        """Tokens a sequence may hold, prompt and output."""
        return self.engine.max_len

    @property
    def vocab_size(self) -> int:
        """Rows of the model's embedding: the ids a request may name (logit_bias, stop_token_ids)."""
        return self.engine.model.config.vocab_size

    @property
    def stats(self) -> dict:
        """The engine's counters (prefill and generated tokens, decode steps, prefix reuse)."""
        return self.engine.stats

    # ---- the async side ------------------------------------------------------------------------------------
    async def stream(self, requests: list[Request]) -> AsyncIterator[Event]:
        """Submit requests (choice i = requests[i]; stop strings in a TextTracker as should_stop) and yield their
        events until all have finished. Leaving the loop early (client gone, task cancelled) cancels whatever is
        still generating."""
        self.start()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        handles = [_Handle(f"gen-{next(self._ids)}", i, r, self.tokenizer, sink) for i, r in enumerate(requests)]
        open_ids = {h.index: h.id for h in handles}
        with self._pending_lock:
            self.pending += len(handles)
        for handle in handles:
            self.inbox.put(("submit", handle))
        try:
            while open_ids:
                event = await events.get()
                if event.finish_reason is not None:
                    open_ids.pop(event.index, None)
                yield event
        finally:
            for rid in open_ids.values():
                self.inbox.put(("cancel", rid))

    # ---- the engine thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            try:
                commands = [self.inbox.get(timeout=self.idle_poll_s)] if not self.engine.has_work() else []
            except queue.Empty:
                commands = []
            while True:
                try:
                    commands.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            for kind, value in commands:
                if kind == "stop":
                    self._fail_all("the server is shutting down", 503)
                    return
                self._command(kind, value)
            if self.engine.has_work():
                try:
                    outputs = self.engine.step()
                except Exception as e:  # a failing step must not take the server down with it
                    log.exception("engine step failed")
                    self._fail_all(f"generation failed: {type(e).__name__}: {e}", 500)
                    continue
                self.counters["steps"] += 1
                self._dispatch(outputs)

    def _command(self, kind: str, value) -> None:
        if kind == "submit":
            handle: _Handle = value
            with self._pending_lock:
                self.pending -= 1
            try:
                self.engine.submit(handle.request)
            except Exception as e:  # a request the engine refuses (ValueError: a 400) must not end the thread
                self.counters["errors"] += 1
                refused = isinstance(e, ValueError)
                message = str(e) if refused else f"generation failed: {type(e).__name__}: {e}"
                handle.emit(Event(handle.index, finish_reason="error", error=message, status=400 if refused else 500))
                return
            self.handles[handle.id] = handle
        elif kind == "cancel" and value in self.handles:
            self.engine.cancel(value)

    def _dispatch(self, outputs) -> None:
        new_tokens = 0
        for out in outputs:
            handle = self.handles.get(out.request_id)
            if handle is None:
                continue
            reason = out.finish_reason
            if reason == "error":  # only this request failed (its sampling); the batch goes on
                del self.handles[handle.id]
                self.counters["errors"] += 1
                handle.emit(Event(handle.index, handle.tracker.release(final=True), handle.tokens, "error",
                                  f"generation failed: {out.error}", 500))
                continue
            if out.token is not None:
                handle.tokens += 1
                new_tokens += 1
                if out.logprob is not None:
                    handle.logprobs.append((out.token, out.logprob))
            if out.prompt_logprobs is not None:
                handle.prompt_logprobs = out.prompt_logprobs
            if reason is None:
                piece = handle.tracker.release()
                if piece:
                    handle.emit(Event(handle.index, piece, handle.tokens))
                continue
            del self.handles[handle.id]
            self.counters["cancelled" if reason == "cancelled" else "finished"] += 1
            handle.emit(Event(handle.index, handle.tracker.release(final=True), handle.tokens, reason))
        self.counters["generated_tokens"] += new_tokens
        if new_tokens:
            self.throughput.add(new_tokens)

    def _fail_all(self, message: str, status: int) -> None:
        """End every request with an error and empty the engine (its state after a failed step is unknown)."""
        for handle in self.handles.values():
            handle.emit(Event(handle.index, tokens=handle.tokens, finish_reason="error", error=message, status=status))
        self.counters["errors"] += len(self.handles)
        self.handles.clear()
        self.engine.reset()
