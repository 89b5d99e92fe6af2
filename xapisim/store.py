"""The object store: every XAPI object, its change generations, and the event log.

One re-entrant lock guards everything; a condition variable on it wakes blocked
``event.from`` calls.  Every change bumps a global generation; an object keeps
the generation it was created and last modified at, and destroyed objects leave
a tombstone, so ``event.from`` can answer "what changed since generation g"
exactly as xapi does (see ``collect``).

Records are copy-on-write (see ``datamodel.Record``): readers may take a record
under the lock and encode it after releasing it.
"""

from __future__ import annotations

import random
import threading
import uuid as uuidlib
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Any

from .datamodel import CLASSES, Record
from .errors import XapiError, handle_invalid

# Deleted objects remembered for event.from; older deletions are forgotten (a
# client that far behind re-reads everything anyway).
TOMBSTONES = 200_000


class Subscription:
    """The ``classes`` argument of event.from: ``*``, ``vm``, or ``vm/<ref>``."""

    def __init__(self, classes: Iterable[str]) -> None:
        self.all = False
        self.classes: set[str] = set()
        self.objects: set[tuple[str, str]] = set()
        for c in classes:
            c = str(c)
            if c == "*":
                self.all = True
            elif "/" in c:
                cls, ref = c.split("/", 1)
                self.objects.add((cls.lower(), ref))
            else:
                self.classes.add(c.lower())

    def matches_class(self, cls_lower: str) -> bool:
        return self.all or cls_lower in self.classes or any(c == cls_lower for c, _ in self.objects)

    def matches(self, cls_lower: str, ref: str) -> bool:
        return self.all or cls_lower in self.classes or (cls_lower, ref) in self.objects


class Store:
    def __init__(self, seed: int | None = None) -> None:
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.tables: dict[str, dict[str, Record]] = {c: {} for c in CLASSES}
        self.by_uuid: dict[str, dict[str, str]] = {c: {} for c in CLASSES}
        self.class_of: dict[str, str] = {}
        self.created: dict[str, int] = {}
        # ref -> generation of its last change, oldest change first.
        self.changes: OrderedDict[str, int] = OrderedDict()
        # (deleted_gen, created_gen, class, ref), oldest first.
        self.tombstones: deque[tuple[int, int, str, str]] = deque(maxlen=TOMBSTONES)
        self.generation = 0
        # While building a preset, refs and uuids come from a seeded generator so
        # that a restarted simulator has the same objects; afterwards they are random.
        self.rng: random.Random | None = random.Random(seed) if seed is not None else None

    # -- identifiers ------------------------------------------------------

    def new_uuid(self) -> str:
        if self.rng is not None:
            return str(uuidlib.UUID(int=self.rng.getrandbits(128), version=4))
        return str(uuidlib.uuid4())

    def new_ref(self) -> str:
        return "OpaqueRef:" + self.new_uuid()

    def stop_seeding(self) -> None:
        self.rng = None

    # -- reads ------------------------------------------------------------

    def get(self, ref: str) -> Record | None:
        cls = self.class_of.get(ref)
        return None if cls is None else self.tables[cls][ref]

    def rec(self, cls: str, ref: str) -> Record:
        """The record of ``ref``, which must be a ``cls``; else HANDLE_INVALID [cls, ref]."""
        if self.class_of.get(ref) != cls:
            raise handle_invalid(cls, ref)
        return self.tables[cls][ref]

    def exists(self, cls: str, ref: str) -> bool:
        return self.class_of.get(ref) == cls

    def all(self, cls: str) -> dict[str, Record]:
        """A snapshot (shallow copy) of a table, safe to iterate after the lock is released."""
        with self.lock:
            return dict(self.tables[cls])

    def ref_by_uuid(self, cls: str, uuid: str) -> str:
        ref = self.by_uuid[cls].get(uuid)
        if ref is None:
            raise XapiError("UUID_INVALID", cls, uuid)
        return ref

    # -- writes -----------------------------------------------------------

    def _touch(self, ref: str) -> None:
        self.generation += 1
        self.changes[ref] = self.generation
        self.changes.move_to_end(ref)
        self.cond.notify_all()

    def create(self, cls: str, values: dict[str, Any], ref: str | None = None) -> str:
        with self.lock:
            rec = Record(CLASSES[cls].defaults())
            unknown = values.keys() - rec.keys()
            if unknown:
                raise KeyError(f"{cls} has no field(s) {sorted(unknown)}")
            rec.update(values)
            if not rec.get("uuid"):
                rec["uuid"] = self.new_uuid()
            ref = ref or self.new_ref()
            self.tables[cls][ref] = rec
            self.by_uuid[cls][rec["uuid"]] = ref
            self.class_of[ref] = cls
            self._touch(ref)
            self.created[ref] = self.generation
            return ref

    def update(self, ref: str, values: dict[str, Any]) -> Record:
        """Store a new version of ``ref`` with ``values`` changed; a no-op write makes no event."""
        with self.lock:
            cls = self.class_of[ref]
            old = self.tables[cls][ref]
            if all(k in old and old[k] == v for k, v in values.items()):
                return old
            unknown = values.keys() - old.keys()
            if unknown:
                raise KeyError(f"{cls} has no field(s) {sorted(unknown)}")
            new = Record(old)
            new.update(values)
            self.tables[cls][ref] = new
            self._touch(ref)
            return new

    def touch(self, ref: str) -> int:
        """Record a change of ``ref`` without changing it (event.inject); returns the generation before."""
        with self.lock:
            before = self.generation
            self._touch(ref)
            return before

    def destroy(self, ref: str) -> None:
        with self.lock:
            cls = self.class_of.pop(ref, None)
            if cls is None:
                return
            rec = self.tables[cls].pop(ref)
            self.by_uuid[cls].pop(rec["uuid"], None)
            self.changes.pop(ref, None)
            created = self.created.pop(ref, 0)
            self.generation += 1
            self.tombstones.append((self.generation, created, cls, ref))
            self.cond.notify_all()

    # Set and map fields hold lists and dicts that are never changed in place:
    # these helpers build the new value.

    def set_add(self, ref: str, field: str, value: Any) -> None:
        with self.lock:
            cur = self.get(ref)
            if cur is not None and value not in cur[field]:
                self.update(ref, {field: [*cur[field], value]})

    def set_remove(self, ref: str, field: str, value: Any) -> None:
        with self.lock:
            cur = self.get(ref)
            if cur is not None and value in cur[field]:
                self.update(ref, {field: [x for x in cur[field] if x != value]})

    def map_put(self, ref: str, field: str, key: str, value: Any) -> None:
        with self.lock:
            cur = self.get(ref)
            if cur is not None:
                self.update(ref, {field: {**cur[field], key: value}})

    def map_del(self, ref: str, field: str, key: str) -> None:
        with self.lock:
            cur = self.get(ref)
            if cur is not None and key in cur[field]:
                m = dict(cur[field])
                del m[key]
                self.update(ref, {field: m})

    # -- events -----------------------------------------------------------

    def collect(self, sub: Subscription, since: int) -> tuple[list[dict[str, Any]], int]:
        """Events for the subscribed objects changed after generation ``since``.

        As xapi: one event per object, carrying its current record; ``add`` if
        the object was created after ``since``, else ``mod``; ``del`` for an
        object destroyed since that existed at ``since`` (one created and
        destroyed in between gives nothing).  Returns the events and the
        current generation, to put in the next token.  Call with the lock held.
        """
        events: list[dict[str, Any]] = []
        for ref, gen in reversed(self.changes.items()):
            if gen <= since:
                break
            cls = self.class_of[ref]
            low = cls.lower()
            if not sub.matches(low, ref):
                continue
            op = "add" if self.created[ref] > since else "mod"
            events.append(
                {
                    "id": str(gen),
                    "timestamp": f"{gen}.0",
                    "class": low,
                    "operation": op,
                    "ref": ref,
                    "snapshot": self.tables[cls][ref],
                }
            )
        for deleted, created, cls, ref in reversed(self.tombstones):
            if deleted <= since:
                break
            low = cls.lower()
            if created <= since and sub.matches(low, ref):
                events.append(
                    {"id": str(deleted), "timestamp": f"{deleted}.0", "class": low, "operation": "del", "ref": ref}
                )
        # Oldest first, as a client applying them in order expects.
        events.sort(key=lambda e: int(e["id"]))
        return events, self.generation

    def valid_ref_counts(self) -> dict[str, int]:
        with self.lock:
            return {cls.lower(): len(t) for cls, t in self.tables.items()}
