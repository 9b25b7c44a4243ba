"""The host-memory tier of one node: snapshots kept in RAM, newest first, with a bounded persist
queue.

Contract (no Ray, no I/O: the NodeAgent wraps it): `put()` stores a snapshot's files and manifest as
the primary copy (`role="memory"`) or a replica from a peer (`role="peer"`). The newest `keep`
snapshots stay; an older one stays only while it still waits to be persisted. At most `max_pending`
snapshots wait for storage besides the one the persister is writing (`claim()`): past that the
oldest waiting one is dropped (never the newest, never the one being written: its upload would be
lost work, and undone as if a rollback had abandoned it; a failed upload is `release()`d) and the
drop is returned as an event for the journal.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class Entry:
    step: int
    files: dict[str, bytes]
    manifest: dict
    role: str  # "memory" (this node's rank wrote it) or "peer" (a replica)
    persist: bool = False  # still has to reach storage
    persisted: bool = False

    def summary(self) -> dict:
        return {
            "step": self.step,
            "role": self.role,
            "persisted": self.persisted,
            "bytes": sum(len(b) for b in self.files.values()),
            "fingerprint": self.manifest.get("fingerprint"),
        }


@dataclass
class MemoryTier:
    keep: int
    max_pending: int
    entries: dict[int, Entry] = field(default_factory=dict)
    lock: threading.Condition = field(default_factory=threading.Condition)
    writing: Entry | None = None  # the snapshot the persister is writing (claimed): never dropped

    def put(self, entry: Entry) -> list[dict]:
        """Store `entry`; returns the events (drops) it caused."""
        events = []
        with self.lock:
            self.entries[entry.step] = entry
            pending = sorted(
                s
                for s, e in self.entries.items()
                if e.persist and not e.persisted and e is not self.writing
            )
            while len(pending) > self.max_pending:
                oldest = pending.pop(0)
                self.entries[oldest].persist = False
                events.append(
                    {
                        "event": "persist_dropped",
                        "step": oldest,
                        "reason": f"{self.max_pending} snapshots already waiting for storage",
                    }
                )
            self._evict()
            self.lock.notify_all()
        return events

    def _evict(self) -> None:
        newest = sorted(self.entries, reverse=True)[: self.keep]
        for step in list(self.entries):
            e = self.entries[step]
            if step not in newest and not (e.persist and not e.persisted):
                del self.entries[step]

    def next_pending(self) -> Entry | None:
        """The oldest snapshot still waiting for storage."""
        with self.lock:
            pending = [e for e in self.entries.values() if e.persist and not e.persisted]
            return min(pending, key=lambda e: e.step) if pending else None

    def claim(self) -> Entry | None:
        """`next_pending()`, now the one being written: no later `put` drops it (a rollback's
        `forget_after` still may) until `release()` or the next claim."""
        with self.lock:
            self.writing = self.next_pending()
            return self.writing

    def release(self) -> None:
        """The claimed snapshot's upload failed (nothing of it is visible): it may be dropped
        again, so one that can never be written does not hold the queue for good."""
        with self.lock:
            self.writing = None

    def mark_persisted(self, step: int) -> None:
        with self.lock:
            if step in self.entries:
                self.entries[step].persisted = True
            self._evict()
            self.lock.notify_all()

    def forget_after(self, step: int) -> list[int]:
        """Drop every snapshot newer than `step`, primaries and replicas, waiting for storage or
        not (a rollback abandoned them: nothing newer may be restored or persisted; an upload
        already under way is undone by the persister); the steps dropped."""
        with self.lock:
            gone = [s for s in self.entries if s > step]
            for s in gone:
                del self.entries[s]
            return sorted(gone)

    def get(self, step: int) -> Entry | None:
        with self.lock:
            return self.entries.get(step)

    def inventory(self) -> list[dict]:
        with self.lock:
            return [e.summary() for _, e in sorted(self.entries.items(), reverse=True)]
