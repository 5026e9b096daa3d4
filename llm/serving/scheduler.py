"""The batching scheduler of llm.serve: one thread owns the model and generates the waiting rows in batches.

A request is a ``Job`` of one or more ``Row`` s (one per prompt and choice: ``n=3`` is three rows). ``submit`` queues
the rows; the scheduler thread takes the oldest waiting row and every later one that fits the same left-padded batch
(``llm.core.sampling.fits``: longest prompt + largest budget <= the context), up to ``max_batch`` rows, and runs one
``Generation`` over them: each step is one forward pass for the whole batch. Each row's tokens go through its own
``TextStream`` (stop strings, partial UTF-8 characters) and its text deltas are handed to the job's ``notify`` as
``Event`` s, from the scheduler thread (the HTTP side moves them onto its event loop). A row ends at EOS, at its
``max_tokens``, at a stop string or when its job is cancelled (the client went away): ``Generation.stop`` drops it
from the batch and the KV cache at the next step, which frees its share of the work.

Rows that arrive while a batch runs join it between two steps (continuous batching: ``Generation.add`` prefills
them and merges them into the running cache) while there is room (``max_batch`` rows) and the context allows
(``Generation.can_add``); the others wait for the next batch. Before forming a new batch the scheduler waits while
rows keep arriving (``batch_wait_ms``, 5 ms without a new row, 20 ms at most), so that clients answered together
by the last batch, who come back within milliseconds of each other, start the next one together.

``stats`` counts what happened (requests, batches and their sizes, steps, tokens, cancelled rows), for
``GET /metrics`` and for tests, which also use ``pause``/``resume``, ``on_step`` and ``wait_for`` to stage
concurrency deterministically instead of sleeping.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llm.core.model import Transformer
from llm.core.sampling import Generation, Sampling, fits
from llm.generate import TextStream


@dataclass(frozen=True)
class Event:
    """What a row produced: new ``text``; on its last event ``finish_reason`` ("stop"/"length") and the number of
    tokens it generated; ``error`` when its batch failed (a bug: the server keeps serving the other requests)."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Row:
    """One sequence to generate: a prompt's tokens, its sampling settings and stop strings, its choice index."""

    prompt: list[int]
    sampling: Sampling
    stop: tuple[str, ...] = ()
    index: int = 0
    job: Job | None = field(default=None, repr=False)  # set by Job


class Job:
    """One request's rows; ``notify`` receives their events in the scheduler thread (it must not block)."""

    def __init__(self, rows: Sequence[Row], notify: Callable[[Event], None]) -> None:
        self.rows, self.notify = list(rows), notify
        self.cancelled = False  # set by Scheduler.cancel; the scheduler reads it between steps
        for row in self.rows:
            row.job = self


@dataclass
class Stats:
    """Counters of the scheduler's work (read them through ``Scheduler.snapshot``)."""

    requests: int = 0  # jobs submitted
    rows: int = 0  # rows submitted
    waiting: int = 0  # rows queued now
    running: int = 0  # rows in the batch being generated now
    batches: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # rows in a batch -> how many batches had that many
    joined: int = 0  # rows that joined a batch already running (continuous batching)
    steps: int = 0  # forward passes after the prefill, one per generated position of a batch
    tokens: int = 0  # tokens generated, all rows
    rows_finished: int = 0  # rows that ended, for any reason (cancelled ones included)
    rows_cancelled: int = 0  # rows stopped because their client went away (in a batch or still waiting)
    cancelled_requests: int = 0  # jobs cancelled (a client disconnected before its answer was complete)
    errors: int = 0  # batches that failed with an exception


class Scheduler:
    """The model's one user: a thread that generates the submitted rows in batches (see the module docstring)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Any,
        eos_ids: Sequence[int],
        pad_id: int,
        max_batch: int = 16,
        batch_wait_ms: float = 5.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        self.model, self.tokenizer, self.eos_ids, self.pad_id = model, tokenizer, list(eos_ids), pad_id
        self.max_batch, self.max_len = max_batch, model.cfg.max_seq_len
        self.batch_wait = batch_wait_ms / 1000
        self.stats = Stats()
        # Tests and benchmarks: runs in the scheduler thread after each step of a batch (it may block to hold the
        # batch at that step, e.g. while a client disconnects).
        self.on_step: Callable[[], None] | None = None
        self._cond = threading.Condition()  # guards the queue, the flags and stats; notified on every change
        self._waiting: deque[Row] = deque()
        self._paused = self._closed = False
        self._thread = threading.Thread(target=self._loop, name="llm.serve scheduler", daemon=True)

    # ------------------------------------------------------------------------------------------- the HTTP side

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop after the current batch (waiting rows are dropped: the server is going away with their clients)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, job: Job) -> None:
        """Queue a job's rows. Each row must fit the context alone (the API checks first and answers 400)."""
        for row in job.rows:
            if not row.prompt or not fits([len(row.prompt)], [row.sampling.max_new_tokens], self.max_len):
                raise ValueError(f"row {row.index}: {len(row.prompt)} prompt tokens + max_tokens do not fit")
        with self._cond:
            self._waiting.extend(job.rows)
            self.stats.requests += 1
            self.stats.rows += len(job.rows)
            self.stats.waiting = len(self._waiting)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The job's client is gone: its rows stop at the next step (or are dropped if still waiting)."""
        with self._cond:
            if not job.cancelled:
                job.cancelled = True
                self.stats.cancelled_requests += 1
                self._cond.notify_all()

    def pause(self) -> None:
        """Form no new batch until ``resume`` (the current one runs on): lets a test queue rows, then batch them."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            return self._snapshot()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> bool:
        """Block until ``predicate(snapshot)`` holds (True) or ``timeout`` seconds pass (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._snapshot()), timeout)

    def _snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {**vars(s), "batch_sizes": dict(s.batch_sizes), "max_batch": self.max_batch}

    # ------------------------------------------------------------------------------------------ the scheduler

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            try:
                self._generate(batch)
            except Exception as err:  # a bug must not take the server down: fail this batch, serve the next
                traceback.print_exc(file=sys.stderr)
                with self._cond:
                    self.stats.errors += 1
                for row in batch:
                    self._send(row, Event(row.index, error=f"generation failed: {type(err).__name__}: {err}"))
            finally:
                with self._cond:
                    self.stats.running = 0
                    self._cond.notify_all()

    def _next_batch(self) -> list[Row] | None:
        """The oldest waiting row and the later ones that fit one batch with it; None once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or (self._waiting and not self._paused))
            self._gather()
            if self._closed:
                return None
            batch = self._take(self.max_batch, lambda rows: fits(*_shape(rows), self.max_len))
            if batch:
                self.stats.batches += 1
                self.stats.batch_sizes[len(batch)] = self.stats.batch_sizes.get(len(batch), 0) + 1
                self.stats.running = len(batch)
            self._cond.notify_all()
            return batch

    def _take(self, room: int, fit: Callable[[list[Row]], bool]) -> list[Row]:
        """The waiting rows, oldest first, that fit together (``fit``) up to ``room`` rows (lock held); the others
        keep their place. A row whose client left while it waited never reaches the model."""
        taken: list[Row] = []
        keep: deque[Row] = deque()
        for row in self._waiting:
            if row.job.cancelled:
                self.stats.rows_cancelled += 1
                self.stats.rows_finished += 1
                self._send(row, Event(row.index, finish_reason="stop"))
            elif len(taken) < room and fit([*taken, row]):
                taken.append(row)
            else:  # a later batch: the head of the queue is always taken by a new batch, so no row waits forever
                keep.append(row)
        self._waiting = keep
        self.stats.waiting = len(keep)
        return taken

    def _join(self, gen: Generation, open_rows: int) -> list[Row]:
        """Waiting rows that join the running batch now (room and context permitting); none while paused."""
        with self._cond:
            if self._paused or not self._waiting or open_rows >= self.max_batch:
                return []
            rows = self._take(self.max_batch - open_rows, lambda rows: gen.can_add(*_shape(rows)))
            self.stats.joined += len(rows)
            self.stats.running = open_rows + len(rows)
            self._cond.notify_all()
            return rows

    def _gather(self) -> None:
        """Wait (lock held, released while waiting) while rows keep arriving, up to 4 x batch_wait in all.

        Clients that got their answers at the end of a batch send their next requests within milliseconds of each
        other; without this short wait the first to arrive would start a batch alone and the others would join it
        one prefill at a time. A lone request pays one batch_wait (5 ms by default).
        """
        deadline = time.monotonic() + 4 * self.batch_wait
        while not self._closed and 0 < len(self._waiting) < self.max_batch:
            seen, left = len(self._waiting), min(self.batch_wait, deadline - time.monotonic())
            if left <= 0 or not self._cond.wait_for(lambda n=seen: self._closed or len(self._waiting) != n, left):
                return

    def _generate(self, batch: list[Row]) -> None:
        batch = list(batch)  # grows as rows join
        gen = Generation(
            self.model, [r.prompt for r in batch], [r.sampling for r in batch], eos_id=self.eos_ids, pad_id=self.pad_id
        )
        streams = [TextStream(self.tokenizer, r.stop) for r in batch]
        open_rows = set(range(len(batch)))
        cancelled: set[int] = set()

        def finish(i: int) -> None:
            open_rows.discard(i)
            text = "" if streams[i].stopped else streams[i].flush()  # text held back for a possible stop string
            reason = "stop" if streams[i].stopped or i in cancelled else gen.finish_reason[i] or "stop"
            with self._cond:
                self.stats.rows_finished += 1
                self.stats.rows_cancelled += i in cancelled
                self._cond.notify_all()
            self._send(batch[i], Event(batch[i].index, text, reason, len(gen.tokens[i])))

        for step in gen:
            for i, token in step.items():
                text = streams[i].push(token)
                if text:
                    self._send(batch[i], Event(batch[i].index, text))
                if streams[i].stopped:
                    gen.stop(i)
            for i in open_rows:
                if batch[i].job.cancelled and i not in cancelled:
                    cancelled.add(i)
                    gen.stop(i)
            with self._cond:
                self.stats.steps += 1
                self.stats.tokens += len(step)
                self._cond.notify_all()
            # rows that ended this step: at EOS or their budget (finish_reason is set), or stopped just above
            for i in sorted(open_rows):
                if gen.finish_reason[i] is not None or streams[i].stopped or i in cancelled:
                    finish(i)
            joining = self._join(gen, len(open_rows))
            if joining:  # rows that arrived while this batch ran: they step with it from the next step on
                ids = gen.add([r.prompt for r in joining], [r.sampling for r in joining])
                assert ids == list(range(len(batch), len(batch) + len(joining)))
                batch += joining
                streams += [TextStream(self.tokenizer, r.stop) for r in joining]
                open_rows.update(ids)
            if self.on_step is not None:
                self.on_step()
        for i in sorted(open_rows):  # the rows that ended at EOS in the last step (no step was yielded)
            finish(i)

    @staticmethod
    def _send(row: Row, event: Event) -> None:
        try:
            row.job.notify(event)
        except Exception:  # a notify that fails (its event loop closed) loses only that client's events
            traceback.print_exc(file=sys.stderr)


def _shape(rows: Sequence[Row]) -> tuple[list[int], list[int]]:
    """(prompt lengths, max_new_tokens) of rows, as fits and Generation.can_add take them."""
    return [len(r.prompt) for r in rows], [r.sampling.max_new_tokens for r in rows]
