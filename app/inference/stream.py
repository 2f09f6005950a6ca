"""From engine-thread tokens to harmony text pieces on the event loop.

`TokenStream` is the engine's `TokenSink` for one request: the engine thread hands it tokens and it
forwards them into an asyncio queue. `Assembler` turns those tokens into reasoning/content deltas
(the harmony channels), applies `stop` strings and keeps the usage and timings.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field

from app.ml.harmony import StreamDecoder


class CollectingSink:
    """A blocking TokenSink for in-process callers (tests, benchmarks): keeps tokens; wait() for the end."""

    def __init__(self, timeout_s: float = 120.0) -> None:
        self.tokens: list[int] = []
        self.reason: str | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.timeout_s = timeout_s

    def put_token(self, token_id: int) -> None:
        self.tokens.append(token_id)

    def finish(self, reason: str, completion_tokens: int) -> None:
        self.reason = reason
        self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()

    def cancelled(self) -> bool:
        return False

    def wait(self) -> list[int]:
        if not self.done.wait(self.timeout_s):
            raise TimeoutError(f"the engine did not finish this request within {self.timeout_s} s")
        if self.error is not None:
            raise self.error
        return self.tokens


@dataclass
class _End:
    reason: str
    completion_tokens: int
    error: BaseException | None = None


class TokenStream:
    """A TokenSink whose tokens are read with `async for` on the loop that created it.

    Tokens are handed over in batches: the engine thread appends to a list and wakes the loop only
    when no wake-up is pending, so under load one cross-thread call carries every token that arrived
    since the loop last looked (at 64 streams, one wake-up per token was most of the API's cost)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[list[int | _End]] = asyncio.Queue()
        self._cancel = threading.Event()
        self._lock = threading.Lock()  # the pending batch, and finish/fail taking effect once
        self._pending: list[int | _End] = []
        self._wake_pending = False
        self._is_ended = False
        self.end: _End | None = None

    # engine thread -------------------------------------------------------------------------------
    def put_token(self, token_id: int) -> None:
        self._post(token_id)

    def finish(self, reason: str, completion_tokens: int) -> None:
        self._end(_End(reason, completion_tokens))

    def fail(self, error: BaseException) -> None:
        self._end(_End("error", 0, error))

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # event loop ----------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the engine to stop this row at its next token (client gone, stop string seen)."""
        self._cancel.set()

    async def batches(self) -> AsyncIterator[list[int]]:
        """Yield the token ids handed over so far, a list at a time (never empty), until the engine
        ends the row; raise its error if it failed."""
        while True:
            items = await self._queue.get()
            tokens = [t for t in items if not isinstance(t, _End)]
            end = items[-1] if isinstance(items[-1], _End) else None
            if tokens:
                yield tokens  # type: ignore[misc]  # the _End was filtered out
            if end is not None:
                self.end = end
                if end.error is not None:
                    raise end.error
                return

    async def tokens(self) -> AsyncIterator[int]:
        """Yield token ids one at a time until the engine ends the row; raise its error if it failed."""
        async for batch in self.batches():
            for token in batch:
                yield token

    def _end(self, end: _End) -> None:
        with self._lock:
            if self._is_ended:
                return
            self._is_ended = True
        self._post(end)

    def _post(self, item: int | _End) -> None:
        with self._lock:
            self._pending.append(item)
            if self._wake_pending:
                return  # the loop has not looked yet: it takes this one with the rest
            self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._hand_over)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._cancel.set()

    def _hand_over(self) -> None:
        with self._lock:
            items, self._pending, self._wake_pending = self._pending, [], False
        self._queue.put_nowait(items)


@dataclass
class Delta:
    """One streamed piece: text for the reasoning (analysis channel) or the content (other channels)."""

    kind: str  # "reasoning" | "content"
    text: str


@dataclass
class Completion:
    reasoning: str
    content: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float]


@dataclass
class _StopFilter:
    """Cuts the content at the first stop string, holding back text that may be the start of one."""

    stops: list[str]
    seen: str = ""
    sent: int = 0
    hit: bool = False

    def feed(self, text: str) -> str:
        self.seen += text
        cut = min((i for i in (self.seen.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            return self._release(cut)
        hold = max((len(s) - 1 for s in self.stops), default=0)
        return self._release(max(self.sent, len(self.seen) - hold))

    def flush(self) -> str:
        return "" if self.hit else self._release(len(self.seen))

    def _release(self, upto: int) -> str:
        out, self.sent = self.seen[self.sent : upto], max(self.sent, upto)
        return out


@dataclass
class Assembler:
    """Drives one TokenStream to its end, yielding Deltas; `completion` is filled in at the end."""

    stream: TokenStream
    prompt_tokens: int
    stop: list[str] = field(default_factory=list)
    completion: Completion | None = None
    on_complete: Callable[[Completion], None] | None = None  # metrics
    _received: int = 0

    async def deltas(self) -> AsyncIterator[Delta]:
        started = time.monotonic()
        first: float | None = None
        decoder, stops = StreamDecoder(), _StopFilter(self.stop)
        parts: dict[str, list[str]] = {"reasoning": [], "content": []}
        try:
            async for batch in self.stream.batches():
                first = first or time.monotonic()
                # One delta per kind change, not per token: a batch is what arrived while the loop was
                # busy, so under load the client gets fewer, longer deltas (the same text).
                for delta in _merged(self._batch_pieces(batch, decoder, stops)):
                    parts[delta.kind].append(delta.text)
                    yield delta
                if stops.hit:
                    self.stream.cancel()  # the rest would be thrown away: stop generating it
                    break
            for delta in [*self._pieces(decoder.finish(), stops), *self._flush(stops)]:
                parts[delta.kind].append(delta.text)
                yield delta
        finally:
            self.stream.cancel()  # a no-op once ended; stops the row if the client went away
        self.completion = self._complete(parts, stops.hit, started, first)
        if self.on_complete is not None:
            self.on_complete(self.completion)

    def _batch_pieces(self, batch: list[int], decoder: StreamDecoder, stops: _StopFilter) -> Iterator[Delta]:
        for token in batch:
            self._received += 1
            yield from self._pieces(decoder.feed(token), stops)
            if stops.hit:
                return

    @staticmethod
    def _pieces(piece: tuple[str, str] | None, stops: _StopFilter) -> list[Delta]:
        if piece is None or stops.hit:
            return []
        channel, text = piece
        if channel == "analysis":
            return [Delta("reasoning", text)]
        kept = stops.feed(text) if stops.stops else text
        return [Delta("content", kept)] if kept else []

    @staticmethod
    def _flush(stops: _StopFilter) -> list[Delta]:
        rest = stops.flush() if stops.stops else ""
        return [Delta("content", rest)] if rest else []

    def _complete(
        self, parts: dict[str, list[str]], stopped: bool, started: float, first: float | None
    ) -> Completion:
        end = self.stream.end
        reason = "stop" if stopped else (end.reason if end else "cancelled")
        generated = end.completion_tokens if end else self._received
        total = time.monotonic() - started
        decode_s = total - ((first or started) - started)
        timings = {
            "first_token_ms": round(((first or started) - started) * 1000, 2),
            "total_ms": round(total * 1000, 2),
            "tokens_per_s": round(generated / decode_s, 2) if decode_s > 0 and generated else 0.0,
        }
        return Completion(
            reasoning="".join(parts["reasoning"]),
            content="".join(parts["content"]),
            finish_reason=reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=generated,
            timings=timings,
        )


def _merged(deltas: Iterable[Delta]) -> list[Delta]:
    """Adjacent deltas of the same kind joined into one."""
    out: list[Delta] = []
    for delta in deltas:
        if out and out[-1].kind == delta.kind:
            out[-1] = Delta(delta.kind, out[-1].text + delta.text)
        else:
            out.append(delta)
    return out
