"""The commit journal: known spend survives crashes and exhausted retries (PROTOCOL.md section 6, durable profile).

Before a settlement (commit, or the event that replaces an expired commit) first leaves the process, its request is
written to a record file; the record goes away only on a definite answer (success, or a rejection we understand).
A process that crashed, or gave up retrying, leaves the record behind; `replay()` (run by `Client.recover()`, and on
client start) sends it again with the SAME idempotency key, so the authority applies it at most once.

Layout: `<dir>/<partition>/v2-<sha256(reservation_id)>.json`, partition = hash of (authority, principal): a store
URL, or a server URL and tenant, never an API key, so a rotated key finds its records. Writes are atomic (temp file
+ rename) and owner-only (0600). A record that cannot be read is renamed `*.quarantined` and reported, not sent.
One replayer per partition at a time (an flock on the partition); the idempotency key makes a settlement that a
live process and a replayer both send count once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CyclesError, LimitExceeded, ReservationExpired
from .models import CommitRequest, EventCreateRequest

log = logging.getLogger("cycles")

RECORD_VERSION = 2
# answers after which sending again can never succeed: the record is done
TERMINAL_CODES = {"RESERVATION_FINALIZED", "NOT_FOUND", "INVALID_REQUEST", "UNIT_MISMATCH", "IDEMPOTENCY_MISMATCH"}


def record_name(reservation_id: str) -> str:
    return f"v2-{hashlib.sha256(reservation_id.encode()).hexdigest()}.json"


def partition_name(authority: str, principal: str | None) -> str:
    return hashlib.sha256(f"{authority}\n{principal or ''}".encode()).hexdigest()[:24]


@dataclass
class ReplayReport:
    settled: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)


class Journal:
    def __init__(self, directory: str | os.PathLike[str], *, authority: str, principal: str | None = None) -> None:
        self.root = Path(directory)
        self.dir = self.root / partition_name(authority, principal)

    # ---------------------------------------------------------------------------------------------- records
    def path(self, reservation_id: str) -> Path:
        return self.dir / record_name(reservation_id)

    def write(
        self, reservation_id: str, commit: CommitRequest, event: EventCreateRequest, mode: str = "commit"
    ) -> None:
        self._save(
            {
                "version": RECORD_VERSION,
                "reservation_id": reservation_id,
                "mode": mode,
                "commit": commit.model_dump(mode="json", exclude_none=True),
                "event": event.model_dump(mode="json", exclude_none=True),
                "not_before_ms": None,
                "written_at_ms": int(time.time() * 1000),
            }
        )

    def update(self, reservation_id: str, **changes: Any) -> None:
        record = self._load(self.path(reservation_id))
        if record is not None:
            record.update(changes)
            self._save(record)

    def remove(self, reservation_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(reservation_id).unlink()

    def _save(self, record: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = self.path(record["reservation_id"])
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    @staticmethod
    def _load(path: Path) -> dict[str, Any] | None:
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        if (
            not isinstance(record, dict)
            or record.get("version") != RECORD_VERSION
            or record.get("mode") not in ("commit", "event")
            or path.name != record_name(str(record.get("reservation_id")))
        ):
            raise ValueError(f"unsupported journal record {path.name}")
        CommitRequest.model_validate(record["commit"])
        EventCreateRequest.model_validate(record["event"])
        return record

    def records(self) -> Iterator[Path]:
        if self.dir.is_dir():
            yield from sorted(self.dir.glob("v2-*.json"))

    # ----------------------------------------------------------------------------------------------- replay
    def replay(self, transport: Any, *, deadline_s: float = 5.0) -> ReplayReport:
        """Send every pending record again (same keys), within a time bound; report what happened."""
        report = ReplayReport()
        stop_at = time.monotonic() + deadline_s
        with self._replay_lock() as locked:
            if not locked:  # another worker is replaying this partition
                report.pending.extend(p.name for p in self.records())
                return report
            for path in self.records():
                if time.monotonic() > stop_at:
                    report.pending.append(path.name)
                    continue
                try:
                    record = self._load(path)
                except (ValueError, TypeError, KeyError) as exc:  # pydantic's ValidationError is a ValueError
                    path.rename(path.with_name(path.name + ".quarantined"))
                    report.quarantined.append(path.name)
                    log.warning("cycles journal: quarantined unreadable record %s (%s)", path.name, exc)
                    continue
                if record is None:
                    continue
                self._replay_one(transport, record, report)
        return report

    def _replay_one(self, transport: Any, record: dict[str, Any], report: ReplayReport) -> None:
        rid = record["reservation_id"]
        not_before = record.get("not_before_ms")
        if not_before and time.time() * 1000 < not_before:
            report.pending.append(rid)
            return
        try:
            if record["mode"] == "commit":
                try:
                    transport.commit(rid, CommitRequest.model_validate(record["commit"]))
                except ReservationExpired:
                    self.update(rid, mode="event")  # persisted before the event is sent
                    transport.event(EventCreateRequest.model_validate(record["event"]))
            else:
                transport.event(EventCreateRequest.model_validate(record["event"]))
        except LimitExceeded as exc:
            retry_after = exc.details.get("retry_after_ms")
            wait = retry_after if isinstance(retry_after, int) else 1000
            self.update(rid, not_before_ms=int(time.time() * 1000) + wait)
            report.pending.append(rid)
            return
        except CyclesError as exc:
            if exc.code in TERMINAL_CODES:
                self.remove(rid)
                report.dropped.append(rid)
                log.warning("cycles journal: %s settled elsewhere or refused (%s); record removed", rid, exc.code)
            else:  # unreachable, auth, unknown: keep for the next replay
                report.pending.append(rid)
            return
        self.remove(rid)
        report.settled.append(rid)

    @contextlib.contextmanager
    def _replay_lock(self) -> Iterator[bool]:
        if not self.dir.is_dir():
            yield True
            return
        fd = os.open(self.dir / ".replay.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)
