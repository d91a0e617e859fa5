"""The operator's side of the dead-letter queue: reading, paging, replaying (paced),
deleting and purging dead letters, for the admin API and the ``flask dlq`` commands."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from celery import Celery

from eventflow.clock import isoformat
from eventflow.deadletters.keys import (
    AUDIT_INDEX_KEY,
    DLQ_KEY,
    OPERATION_TTL,
    REPLAY_BATCH,
    REPLAY_SCHEDULE_KEY,
    REPLAY_WINDOW_SHARE,
    SCAN_BATCH,
    _json,
    _text,
    audit_key,
    dead_letter_key,
    operation_key,
)
from eventflow.deadletters.selection import (
    LetterFilter,
    decode_cursor,
    encode_cursor,
)
from eventflow.enqueue import build_task_message
from eventflow.schemas import event_schema
from eventflow.scripts import lua_source
from eventflow.settings import Settings
from eventflow.statuses import Step
from eventflow.store import (
    STATS_KEY,
    WATCH_KEY,
    EventStore,
    event_key,
    history_key,
    lease_key,
    quota_key,
)

PAGE = lua_source("eventflow.deadletters", "page.lua")
RESERVE_SLOTS = lua_source("eventflow.deadletters", "reserve_slots.lua")
REPLAY = lua_source("eventflow.deadletters", "replay.lua")
DELETE = lua_source("eventflow.deadletters", "delete.lua")
PURGE = lua_source("eventflow.deadletters", "purge.lua")
REFUSE = lua_source("eventflow.deadletters", "refuse.lua")



@dataclass(frozen=True)
class Page:
    """One page of dead letters, newest first, and the cursor of the next one."""

    items: list[dict[str, Any]]
    next_cursor: str | None


@dataclass(frozen=True)
class ReplayOutcome:
    """What became of one dead letter asked to be replayed.

    ``state``: ``queued``; ``invalid`` (fails today's
    schema: ``errors``); ``deferred`` (the replay schedule is full for now: try again
    after ``retry_after`` seconds); ``missing`` (not in the dead-letter queue).
    """

    event_id: str
    state: str
    errors: dict[str, Any] | None = None
    task_id: str | None = None
    scheduled_for: str | None = None
    retry_after: float | None = None


@dataclass
class ReplayReport:
    """What a bulk replay did (or, for a dry run, would do)."""

    dry_run: bool
    replayed: list[str] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    deferred: int = 0
    retry_after: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "replayed": len(self.replayed),
            "dry_run": self.dry_run,
            "ids": self.replayed,
            "rejected": self.rejected,
            "skipped": self.skipped,
            "deferred": self.deferred,
            "retry_after": self.retry_after,
        }


@dataclass(frozen=True)
class PurgeReport:
    """How many dead letters, and audit trails of letters already gone, were purged."""

    letters: int
    audit_trails: int


def schema_errors(event: Mapping[str, Any]) -> dict[str, Any]:
    """Why ``event`` would be refused by ``POST /api/v1/events`` today (empty if it passes)."""
    return dict(event_schema.validate(dict(event)))


class DeadLetters:
    """Lists, shows, replays, deletes and purges dead letters (for the API and the CLI)."""

    def __init__(self, store: EventStore, celery_app: Celery, settings: Settings) -> None:
        self.store = store
        self.redis = store.redis
        self.celery_app = celery_app
        #: Milliseconds between two paced replays; whole, as Redis keeps the schedule.
        self.interval_ms = max(1, round(1000 / settings.replay_rate))
        self.window_ms = int(settings.visibility_timeout * 1000 * REPLAY_WINDOW_SHARE)
        self._page = self.redis.register_script(PAGE)
        self._reserve_slots = self.redis.register_script(RESERVE_SLOTS)
        self._replay = self.redis.register_script(REPLAY)
        self._delete = self.redis.register_script(DELETE)
        self._refuse = self.redis.register_script(REFUSE)
        self._purge = self.redis.register_script(PURGE)

    # -- reading -----------------------------------------------------------------------

    def get(self, event_id: str) -> dict[str, Any] | None:
        """The dead letter with its audit trail, or ``None`` if it is not in the queue."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zscore(DLQ_KEY, event_id)
        pipe.get(dead_letter_key(event_id))
        pipe.lrange(audit_key(event_id), 0, -1)
        score, raw, audit = pipe.execute()
        if score is None or raw is None:
            return None
        letter: dict[str, Any] = json.loads(raw)
        letter["audit"] = [json.loads(entry) for entry in audit]
        return letter

    def audit(self, event_id: str) -> list[dict[str, Any]]:
        """The audit trail of an event's dead letters, oldest first (kept after replays)."""
        return [json.loads(entry) for entry in self.redis.lrange(audit_key(event_id), 0, -1)]

    def letters(
        self, flt: LetterFilter, after: tuple[int, str] | None = None
    ) -> Iterator[tuple[tuple[int, str], dict[str, Any]]]:
        """Every matching dead letter, newest first, with its position for a cursor.

        Read ``SCAN_BATCH`` at a time, each batch strictly after the last letter of the
        one before (whether or not that letter is still there), so letters added or
        removed meanwhile neither repeat nor hide others.
        """
        max_score = "+inf" if flt.until_ms is None else str(flt.until_ms - 1)
        min_score = "-inf" if flt.since_ms is None else str(flt.since_ms)
        while True:
            cursor_score, cursor_id = after if after is not None else ("", "")
            flat = self._page(keys=[DLQ_KEY],
                              args=[max_score, min_score, cursor_score, cursor_id, SCAN_BATCH])
            if not flat:
                return
            positions = [(int(float(flat[i + 1])), _text(flat[i])) for i in range(0, len(flat), 2)]
            raws = self.redis.mget([dead_letter_key(event_id) for _, event_id in positions])
            for position, raw in zip(positions, raws, strict=True):
                after = position
                if raw is None:  # replayed or deleted since the page was read
                    continue
                letter = json.loads(raw)
                if flt.matches(letter):
                    yield position, letter
            if len(positions) < SCAN_BATCH:
                return

    def page(self, flt: LetterFilter, limit: int, cursor: str | None = None) -> Page:
        """Up to ``limit`` dead letters after ``cursor``, newest first (raises InvalidCursor)."""
        after = decode_cursor(cursor) if cursor else None
        items: list[dict[str, Any]] = []
        last: tuple[int, str] | None = None
        for position, letter in self.letters(flt, after):
            items.append(summary(letter))
            last = position
            if len(items) == limit:
                break
        return Page(items, encode_cursor(last) if last and len(items) == limit else None)

    # -- replaying ---------------------------------------------------------------------

    def replay(self, event_id: str, by: str) -> ReplayOutcome:
        """Queue one dead letter again (same id), unless it fails today's schema."""
        raw = self.redis.get(dead_letter_key(event_id))
        if raw is None or self.redis.zscore(DLQ_KEY, event_id) is None:
            return ReplayOutcome(event_id, "missing")
        letter = json.loads(raw)
        errors = schema_errors(letter["event"])
        if errors:
            self._record_refusal(event_id, by, errors)
            return ReplayOutcome(event_id, "invalid", errors=errors)
        outcomes, retry_after = self._queue([letter], by)
        return outcomes[0] if outcomes else ReplayOutcome(event_id, "deferred",
                                                          retry_after=retry_after)

    def replay_matching(
        self, flt: LetterFilter, by: str, *, dry_run: bool = False, limit: int | None = None
    ) -> ReplayReport:
        """Replay the matching dead letters that failed before now, paced.

        Letters that fail again meanwhile are not taken a second time. When the replay
        schedule is full (``REPLAY_WINDOW_SHARE``), the rest stay in the queue and are
        counted as ``deferred``, with ``retry_after``: call again with the same filter.
        """
        flt = self.snapshot(flt)
        report = ReplayReport(dry_run)
        matching = self.letters(flt)
        while limit is None or len(report.replayed) + len(report.rejected) < limit:
            room = REPLAY_BATCH if limit is None else min(
                REPLAY_BATCH, limit - len(report.replayed) - len(report.rejected))
            batch = [letter for _, letter in itertools.islice(matching, room)]
            if not batch:
                break
            valid = []
            for letter in batch:
                errors = schema_errors(letter["event"])
                if errors:
                    if not dry_run:
                        self._record_refusal(str(letter["id"]), by, errors)
                    report.rejected.append({"id": letter["id"], "reason": "invalid",
                                            "errors": errors})
                elif dry_run:
                    report.replayed.append(str(letter["id"]))
                else:
                    valid.append(letter)
            if not valid:
                continue
            outcomes, retry_after = self._queue(valid, by)
            for outcome in outcomes:
                if outcome.state == "queued":
                    report.replayed.append(outcome.event_id)
                else:
                    report.skipped.append(outcome.event_id)
            if retry_after is not None:  # the schedule is full: count what is left
                report.retry_after = retry_after
                report.deferred = len(valid) - len(outcomes) + sum(1 for _ in matching)
                break
        return report

    def snapshot(self, flt: LetterFilter) -> LetterFilter:
        """``flt`` limited to the letters that failed up to now."""
        return flt.failed_before(int(self.store.clock.now() * 1000) + 1)

    def _queue(
        self, letters: Sequence[Mapping[str, Any]], by: str
    ) -> tuple[list[ReplayOutcome], float | None]:
        """Queue these letters (which pass today's schema) again, paced, in two round trips.

        Returns the outcome of each letter that found room in the replay schedule, in
        order, and, if some did not, the seconds until there is room again.
        """
        slot_ms, now_ms, taken, wait_ms = self._reserve_slots(
            keys=[REPLAY_SCHEDULE_KEY], args=[self.interval_ms, self.window_ms, len(letters)])
        retry_after = round(wait_ms / 1000 + 0.05, 2) if taken < len(letters) else None
        store = self.store
        now, now_ms_local = store.now(), int(store.clock.now() * 1000)
        pipe = self.redis.pipeline(transaction=False) if taken > 1 else None
        outcomes, states = [], []
        for letter in letters[:taken]:
            event_id = str(letter["id"])
            eta = datetime.fromtimestamp(slot_ms / 1000, UTC) if slot_ms > now_ms else None
            scheduled_for = isoformat(slot_ms / 1000) if eta else None
            slot_ms += self.interval_ms
            task_id = str(uuid.uuid4())
            message = build_task_message(self.celery_app, task_id, (event_id,), eta=eta)
            event = letter["event"]
            details = {"by": by, "task_id": task_id,
                       **({"scheduled_for": scheduled_for} if scheduled_for else {})}
            # Written again only if the event's own record was lost: the letter keeps it all.
            recreate = ["id", event_id, "user_id", event["user_id"],
                        "event_type", event["event_type"], "payload", _json(event["payload"]),
                        "producer", letter.get("producer") or "",
                        "attempts", str(letter["attempts"]), "created_at", letter["failed_at"]]
            states.append(self._replay(
                keys=[DLQ_KEY, dead_letter_key(event_id), event_key(event_id),
                      history_key(event_id), message.queue, STATS_KEY, audit_key(event_id),
                      AUDIT_INDEX_KEY, lease_key(event_id), quota_key(event["user_id"]),
                      WATCH_KEY, operation_key(task_id)],
                args=[event_id, now, now_ms_local, store.entry(Step.REPLAYED, **details),
                      message.payload,
                      _json({"action": "replay", "at": now, "outcome": "queued", **details}),
                      OPERATION_TTL, *recreate],
                **({"client": pipe} if pipe is not None else {}),
            ))
            outcomes.append(ReplayOutcome(event_id, "", task_id=task_id,
                                          scheduled_for=scheduled_for))
        if pipe is not None:
            states = pipe.execute()
        return ([replace(outcome, state=_text(state))
                 for outcome, state in zip(outcomes, states, strict=True)], retry_after)

    def _record_refusal(self, event_id: str, by: str, errors: Mapping[str, Any]) -> None:
        # The letter stays in the queue; the refusal joins its audit trail and timeline.
        store = self.store
        self._refuse(
            keys=[audit_key(event_id), AUDIT_INDEX_KEY, history_key(event_id), STATS_KEY,
                  operation_key(str(uuid.uuid4()))],
            args=[event_id, int(store.clock.now() * 1000),
                  _json({"action": "replay", "at": store.now(), "by": by, "outcome": "invalid",
                         "errors": errors}),
                  store.entry(Step.REPLAY_REFUSED, by=by, errors=errors), OPERATION_TTL],
        )

    # -- removing ----------------------------------------------------------------------

    def delete(self, event_id: str, by: str) -> bool:
        """Delete one dead letter (its audit trail records it); ``False`` if unknown."""
        store = self.store
        deleted = self._delete(
            keys=[DLQ_KEY, dead_letter_key(event_id), event_key(event_id), history_key(event_id),
                  audit_key(event_id), AUDIT_INDEX_KEY, operation_key(str(uuid.uuid4()))],
            args=[event_id, int(store.clock.now() * 1000),
                  _json({"action": "deleted", "at": store.now(), "by": by}),
                  store.entry(Step.DEAD_LETTER_DELETED, by=by), store.retention_seconds,
                  OPERATION_TTL],
        )
        return bool(deleted)

    def purge(self, older_than_seconds: float, by: str, *, dry_run: bool = False) -> PurgeReport:
        """Remove dead letters that failed longer ago than this, and old audit trails."""
        store = self.store
        cutoff = int((store.clock.now() - older_than_seconds) * 1000)
        candidates = {_text(m) for m in self.redis.zrangebyscore(DLQ_KEY, "-inf", f"({cutoff}")}
        candidates |= {_text(m) for m in
                       self.redis.zrangebyscore(AUDIT_INDEX_KEY, "-inf", f"({cutoff}")}
        letters = trails = 0
        entry = store.entry(Step.DEAD_LETTER_PURGED, by=by)
        ordered = iter(sorted(candidates))
        while batch := list(itertools.islice(ordered, REPLAY_BATCH)):
            pipe = self.redis.pipeline(transaction=False)
            for event_id in batch:
                self._purge(
                    keys=[DLQ_KEY, dead_letter_key(event_id), event_key(event_id),
                          history_key(event_id), audit_key(event_id), AUDIT_INDEX_KEY],
                    args=[event_id, cutoff, entry, store.retention_seconds,
                          "1" if dry_run else "0"],
                    client=pipe,
                )
            for purged_letter, purged_trail in pipe.execute():
                letters += int(purged_letter)
                trails += int(purged_trail)
        return PurgeReport(letters, trails)


def summary(letter: Mapping[str, Any]) -> dict[str, Any]:
    """A dead letter as listed: without the history and audit trail."""
    return {name: letter.get(name) for name in
            ("id", "event", "producer", "error_type", "error", "attempts", "failed_at")}


