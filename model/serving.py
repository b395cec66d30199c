"""One batched decoder for every session: continuous batching of grounded replies.

A scheduler thread owns the model. A submitted reply is prefilled on its own (its prompt holds images and,
for LMEye, a look: `GroundedLM.prefill`), then joins the running batch at the next step; every step
advances all running replies with one forward of one token each; a reply that ends (EOS, its token limit,
Stop) leaves at once. Each reply keeps its own settings, sampler, `[RET]` retrieval and events: the choices
are `model.generate.Reply`'s, exactly as in solo decoding, only the LM's forward is shared.

The KV cache of the batch is one `DynamicCache`, its rows left-padded to the longest (an attention mask
hides the padding; each row's positions are its own). transformers' continuous batching
(`generate_batch`, paged attention) is not used: it schedules token ids and returns tokens, while these
replies start from embeddings (images and looks spliced into the prompt) and need each step's hidden state
(the `[RET]` query).
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from model.generate import Cancel, Decoding, Event, GenerationSettings, Reply, SearchFn
from model.grounded import GroundedLM
from model.prompt import Turn

_FINISHED = object()
_POLL_S = 0.5  # how often a waiting reply looks at its place in the line


class Busy(RuntimeError):
    """The engine cannot take a reply in time: the waiting line is full, or the reply waited too long."""


@dataclass(frozen=True)
class Waiting:
    """The reply waits for a free row: `ahead` replies will start before it. Sent when the number changes."""
    ahead: int


@dataclass
class _Request:
    make: Callable[[Cancel], Decoding]  # called in the scheduler, given the request itself as the `Cancel`
    cancel: Cancel | None
    abandoned: threading.Event = field(default_factory=threading.Event)
    events: queue.Queue = field(default_factory=queue.Queue)
    queued_at: float = field(default_factory=time.monotonic)

    def is_set(self) -> bool:
        """Whether the reply should stop (the `Cancel` its decoding asks): Stop was pressed, or nobody reads it."""
        return self.abandoned.is_set() or (self.cancel is not None and self.cancel.is_set())


@dataclass
class _Row:
    request: _Request
    decoding: Decoding
    last: torch.Tensor  # (lm_dim,): the hidden state the next token is sampled from
    length: int         # tokens in this row's cache, its padding not counted
    failed: bool = False  # its decoding raised: it leaves at the next step, its error already sent


class DecodeEngine:
    """`submit` a reply from any thread and iterate its events; replies decode together, `max_batch` at a time.

    Up to `max_waiting` more wait for a row, prefilled in arrival order; beyond that, or after waiting
    `max_wait_s`, a reply gets `Busy` instead.
    """

    def __init__(self, model: GroundedLM, max_batch: int = 8, max_waiting: int = 64, max_wait_s: float = 300):
        if max_batch < 1 or max_waiting < 0:
            raise ValueError("max_batch must be at least 1 and max_waiting at least 0")
        self.model, self.max_batch, self.max_waiting, self.max_wait_s = model, max_batch, max_waiting, max_wait_s
        self._line: deque[_Request] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._rows: list[_Row] = []
        self._prefilling = 0  # replies taken from the line whose prompt is being read: their rows are taken
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None                                           # (B, T), 1: a token
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="decode-engine", daemon=True)
        self._thread.start()

    # ---- the client side ------------------------------------------------------------------------
    def submit(self, turns: list[Turn], settings: GenerationSettings | None = None, search: SearchFn | None = None,
               cancel: threading.Event | None = None) -> Iterator[Event | Waiting]:
        """Queue a reply; its events come as `stream_reply` yields them, after `Waiting` events while it waits
        for a row. Setting `cancel` stops it, as does closing the iterator (the client went away)."""
        settings = settings or GenerationSettings()
        return self.submit_decoding(lambda request: Reply(self.model, turns, settings, search, request), cancel)

    def submit_decoding(self, make: Callable[[Cancel], Decoding], cancel: Cancel | None = None
                        ) -> Iterator[Event | Waiting]:
        """Queue any `Decoding` (`make(cancel)` builds it once a row is free); its events come as `decode_alone`
        yields them, after `Waiting` events. A reply is one kind (`submit`), a line of IMMO's Reasoner another."""
        request = _Request(make, cancel)
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._line) >= self.max_waiting + max(0, self.max_batch - len(self._rows) - self._prefilling):
                raise Busy(f"The server is busy: {len(self._rows)} replies are being written and "
                           f"{len(self._line)} are waiting. Try again in a minute.")
            self._line.append(request)
        self._wake.set()
        return self._events(request)

    @property
    def waiting(self) -> int:
        """Replies in line for a row."""
        return len(self._line)

    @property
    def running(self) -> int:
        """Replies being decoded."""
        return len(self._rows)

    def close(self) -> None:
        """Finish: replies still decoding or waiting end with an error."""
        with self._lock:
            self._closed = True
        self._wake.set()
        self._thread.join()

    def _ahead_of(self, request: _Request) -> int | None:
        with self._lock:
            return next((i for i, r in enumerate(self._line) if r is request), None)

    def _events(self, request: _Request) -> Iterator[Event | Waiting]:
        finished, shown_ahead = False, None
        try:
            while True:
                try:
                    event = request.events.get(timeout=_POLL_S)
                except queue.Empty:
                    ahead = self._ahead_of(request)
                    if ahead is not None and ahead != shown_ahead:
                        shown_ahead = ahead
                        yield Waiting(ahead)
                    continue
                if event is _FINISHED:
                    finished = True
                    return
                if isinstance(event, BaseException):
                    raise event
                yield event
        finally:
            if not finished:
                request.abandoned.set()  # leaves the batch (or the line) at the next step

    # ---- the scheduler --------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed:
            self._admit()
            if not self._rows:
                if not self._line:
                    self._wake.wait(timeout=_POLL_S)
                    self._wake.clear()
                continue
            try:
                self._step()
            except Exception as error:  # the shared forward failed: every running reply ends with the error
                for row in self._rows:
                    row.request.events.put(error)
                    row.request.events.put(_FINISHED)
                self._select([])
        with self._lock:
            left = [row.request for row in self._rows] + list(self._line)
            self._line.clear()
        for request in left:
            request.events.put(RuntimeError("the engine was closed"))
            request.events.put(_FINISHED)

    def _next_waiting(self) -> _Request | None:
        """The first reply in line that is still wanted and not out of time, its row taken (`_prefilling`) until
        `_admit` has it in the batch; the others are answered."""
        while True:
            with self._lock:
                if not self._line:
                    return None
                request = self._line.popleft()
                late = time.monotonic() - request.queued_at > self.max_wait_s
                if not request.is_set() and not late:
                    self._prefilling += 1
                    return request
            if not request.is_set():
                request.events.put(Busy(f"The server is busy: no reply could start within {self.max_wait_s:g} s. "
                                        f"Try again in a minute."))
            request.events.put(_FINISHED)

    @torch.no_grad()
    def _admit(self) -> None:
        """Prefill the next waiting reply into a free row: one a step, so that the running replies never wait
        for more than one prefill."""
        while len(self._rows) < self.max_batch and (request := self._next_waiting()) is not None:
            try:
                decoding = request.make(request)
                for event in decoding.opening:
                    request.events.put(event)
                last, cache, events = decoding.prefill()
                for event in events:
                    request.events.put(event)
                self._join(_Row(request, decoding, last, cache.get_seq_length()), cache)
            except Exception as error:  # this reply's own failure (a bad image, a bad setting): the others go on
                request.events.put(error)
                request.events.put(_FINISHED)
                continue
            finally:
                with self._lock:
                    self._prefilling -= 1
            return

    @torch.no_grad()
    def _step(self) -> None:
        """Sample each row's next token, drop the rows that ended, and read the rest in one forward."""
        model = self.model
        logits = model.logits(torch.stack([row.last for row in self._rows]))            # (B, V')
        tokens, ended = [], []
        for i, row in enumerate(self._rows):
            token = None
            if not row.failed:
                try:
                    token = row.decoding.next_token(logits[i])
                except Exception as error:
                    row.request.events.put(error)
                    row.failed = True
            if token is None:
                ended.append(i)
            tokens.append(token)
        finished = [self._rows[i] for i in ended]
        for i in ended:
            if not self._rows[i].failed:
                self._rows[i].decoding.release(self._row_cache(i), self._rows[i].last)
        keep = [i for i in range(len(self._rows)) if i not in ended]
        if ended:
            self._select(keep)  # before their readers hear they are done: `running` is already right then
        for row in finished:
            if not row.failed:
                row.request.events.put(row.decoding.done())
            row.request.events.put(_FINISHED)
        if not keep:
            return
        tokens = torch.tensor([[tokens[i]] for i in keep], device=model.device)          # (B, 1)
        positions = torch.tensor([[row.length] for row in self._rows], device=model.device)
        reasoner = [row.decoding.reasoner for row in self._rows]
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(keep), 1)], 1)     # (B, T + 1)
        hidden, self._cache = model.hidden_states(model.embed_ids(tokens), self._mask, past_key_values=self._cache,
                                                  position_ids=positions,
                                                  reasoner=reasoner if any(reasoner) else False)  # (B, 1, lm_dim)
        for b, row in enumerate(self._rows):
            row.last, row.length = hidden[b, -1], row.length + 1
            try:
                events = row.decoding.fed(int(tokens[b, 0]), row.last)
            except Exception as error:  # its search failed: end this reply with the error
                row.request.events.put(error)
                row.failed = True
                continue
            for event in events:
                row.request.events.put(event)

    # ---- the batch's cache ----------------------------------------------------------------------
    def _join(self, row: _Row, cache: DynamicCache) -> None:
        """Add a prefilled row: the shorter of its cache and the batch's is left-padded to the other's length."""
        row_mask = torch.ones(1, row.length, dtype=torch.long, device=self.model.device)
        if self._cache is None:
            self._rows, self._cache, self._mask = [row], cache, row_mask
            return
        width = self._mask.shape[1]
        if row.length < width:
            _left_pad(cache, width - row.length)
            row_mask = F.pad(row_mask, (width - row.length, 0))
        elif row.length > width:
            _left_pad(self._cache, row.length - width)
            self._mask = F.pad(self._mask, (row.length - width, 0))
        for batch_layer, row_layer in zip(self._cache.layers, cache.layers):
            batch_layer.keys = torch.cat([batch_layer.keys, row_layer.keys])
            batch_layer.values = torch.cat([batch_layer.values, row_layer.values])
        self._rows.append(row)
        self._mask = torch.cat([self._mask, row_mask])

    def _row_cache(self, b: int) -> DynamicCache:
        """Row b's own keys and values, without its padding (which is all before its tokens): a batch of one."""
        start = self._mask.shape[1] - self._rows[b].length
        cache = DynamicCache()
        for i, layer in enumerate(self._cache.layers):
            cache.update(layer.keys[b:b + 1, :, start:], layer.values[b:b + 1, :, start:], i)  # (1, H, length, D)
        return cache

    def _select(self, keep: list[int]) -> None:
        """Keep these rows; drop the columns that are padding in every row left."""
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.model.device)
        self._rows = [self._rows[i] for i in keep]
        self._mask = self._mask[index]
        self._cache.batch_select_indices(index)
        unused = int(self._mask.any(0).long().argmax())  # leading columns with no token in any row
        if unused:
            self._mask = self._mask[:, unused:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]


def _left_pad(cache: DynamicCache, n: int) -> None:
    """n empty positions before every row of every layer (keys and values (B, H, T, D) -> (B, H, n + T, D))."""
    for layer in cache.layers:
        layer.keys = F.pad(layer.keys, (0, 0, n, 0))
        layer.values = F.pad(layer.values, (0, 0, n, 0))
