"""Mirror a pool's XAPI objects into the inventory tables.

``PoolMirror`` is the only writer of inventory rows (the watcher owns one per
pool).  ``full_sync`` takes the ``get_all_records`` of every class and makes
the tables equal to them (rows that disappeared are deleted); ``apply`` takes
a batch of ``event.from`` events.  Both write in bulk, in one transaction, and
announce what changed on the pool's channel-layer group after commit.

The mirror keeps, per class, ``ref -> (pk, uuid, values)`` in memory: refs
resolve to foreign keys without a query, and an event that changes nothing
we store (XAPI sends many: memory_free, allowed_operations...) is dropped
without touching the database or the browsers.  How each class maps to a
model (the specs, and the fields read from XAPI) is in ``inventory.sync_specs``.
"""
from __future__ import annotations

import functools
import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import connection, models, transaction
from django.db.models.functions import Concat
from django.utils import timezone

from eac.realtime import Message, emit_many, inventory_change, inventory_resync, merged_changes, pools_change

from .models import Pool
from .sync_specs import (
    EVENT_CLASSES,
    RECORD_FIELDS,
    SPEC_BY_CLASS,
    SPECS,
    XAPI_CLASSES,
    Spec,
    to_bool,
    to_datetime,
    to_int,
    to_map,
    to_str,
)

log = logging.getLogger(__name__)

NULL_REF = "OpaqueRef:NULL"
# Rows per INSERT statement (the bulk_create path, for databases other than PostgreSQL).
BATCH_SIZE = 2000
# Rows up to which the PostgreSQL upsert sends them as VALUES, in one statement; more go through COPY (_pg_upsert).
VALUES_ROWS = 100


def _pg_upsert(spec: Spec, pool_id: int, items: list[tuple[str, str, dict[str, Any]]],
               known: dict[str, int]) -> list[int]:
    """The PostgreSQL upsert: one INSERT ... ON CONFLICT DO UPDATE RETURNING, from the rows as VALUES when they are
    few (``VALUES_ROWS``), else from a session-local staging table filled by COPY.  Django's bulk_create spends
    ~150 µs of Python per row building and quoting parameters; COPY is done in C, which is what keeps a
    10,000-VM pool's sync in budget.  But the staging table costs three more round trips and its emptying at
    commit: for the few rows of a batch of events (a VM started: itself, its host, two disks, two NICs), that was
    most of the watcher's time with the database, one statement is cheaper.

    A row whose columns are all unchanged is not rewritten (no new row version, no index update: a
    resync of an unchanged pool costs reads only); its pk then comes from ``known`` (uuid -> pk)."""
    assert connection.in_atomic_block, "the staging table empties at commit: call inside a transaction"
    qn = connection.ops.quote_name
    table = spec.model._meta.db_table
    value_columns = tuple(items[0][2])
    # Columns the mirror does not produce (XAPI has no name for a PBD, or a field someone added) get their
    # default on insert and are left alone on update.
    missing = [c for c in spec.defaults if c not in items[0][2]]
    columns = ["pool_id", "uuid", "ref", *value_columns, *spec.auto_now, *missing]
    listed, on_conflict = _upsert_sql(table, tuple(columns), value_columns, tuple(spec.auto_now))
    json_at = [3 + i for i, c in enumerate(value_columns) if c in spec.json_columns]
    tail = [timezone.now()] * len(spec.auto_now) + [spec.defaults[c] for c in missing]
    tail = [json.dumps(v) if isinstance(v, (dict, list)) else v for v in tail]
    latest = {uuid: (ref, values) for ref, uuid, values in items}  # a uuid twice would break ON CONFLICT
    rows = []
    for uuid, (ref, values) in latest.items():
        row = [pool_id, uuid, ref, *values.values(), *tail]
        for i in json_at:
            row[i] = json.dumps(row[i])
        rows.append(row)
    # Only identifiers from the model's metadata, quoted, are formatted into the SQL; values are parameters or COPY.
    with connection.cursor() as cursor:
        if len(rows) <= VALUES_ROWS:
            placeholders = "(" + ", ".join(["%s"] * len(columns)) + ")"
            source = "VALUES " + ", ".join([placeholders] * len(rows))
            params = [value for row in rows for value in row]
        else:
            stage = qn(f"eac_stage_{table}")
            cursor.execute(f"CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS AS "  # noqa: S608
                           f"SELECT {listed} FROM {qn(table)} WITH NO DATA")
            cursor.execute(f"DELETE FROM {stage}")  # noqa: S608
            with cursor.cursor.copy(f"COPY {stage} ({listed}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            source, params = f"SELECT {listed} FROM {stage}", None  # noqa: S608
        cursor.execute(f"INSERT INTO {qn(table)} ({listed}) {source} {on_conflict}", params)  # noqa: S608
        pks = {uuid: pk for pk, uuid in cursor.fetchall()}
        pks.update((uuid, known[uuid]) for uuid in latest if uuid not in pks and uuid in known)
        unknown = [uuid for uuid in latest if uuid not in pks]
        if unknown:  # unchanged rows the caller did not know of (written by someone else): look them up
            cursor.execute(f"SELECT id, uuid FROM {qn(table)} WHERE pool_id = %s AND uuid = ANY(%s)",  # noqa: S608
                           [pool_id, unknown])
            pks.update((uuid, pk) for pk, uuid in cursor.fetchall())
    return [pks[uuid] for _ref, uuid, _values in items]


@functools.lru_cache(maxsize=64)
def _upsert_sql(table: str, columns: tuple[str, ...], value_columns: tuple[str, ...],
                auto_now: tuple[str, ...]) -> tuple[str, str]:
    """(the column list, the ON CONFLICT clause) of ``_pg_upsert``'s INSERT: the same for every batch of a class."""
    qn = connection.ops.quote_name
    compared = ["ref", *value_columns]
    updates = ", ".join(f"{qn(c)} = EXCLUDED.{qn(c)}" for c in [*compared, *auto_now])
    old = ", ".join(f"{qn(table)}.{qn(c)}" for c in compared)
    new = ", ".join(f"EXCLUDED.{qn(c)}" for c in compared)
    return (", ".join(qn(c) for c in columns),
            f"ON CONFLICT (pool_id, uuid) DO UPDATE SET {updates} WHERE ({old}) IS DISTINCT FROM ({new}) "
            "RETURNING id, uuid")


@dataclass
class SyncResult:
    counts: dict[str, int] = field(default_factory=dict)  # full sync: rows per class
    changed: int = 0  # objects written or deleted
    changed_uuids: dict[str, set[str]] = field(default_factory=dict)  # class -> uuids written or deleted
    # The same, less the rows whose change was only in their telemetry (``Spec.telemetry``): what protection judges.
    judged_uuids: dict[str, set[str]] = field(default_factory=dict)
    messages: int = 0


# (pk, uuid, values) of a row, as last written.
_Row = tuple[int, str, tuple]


class PoolMirror:
    """The in-memory image of one pool's rows, and the code that keeps the tables equal to XAPI.

    Not thread-safe: one per watcher thread.  After an exception in ``full_sync``
    or ``apply`` the image may not match the database: call ``full_sync`` again.
    """

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._reset()

    def _reset(self) -> None:
        self.rows: dict[str, dict[str, _Row]] = {spec.cls: {} for spec in SPECS}
        self.master_ref = ""
        self.pool_ref = ""
        self.pool_values: tuple = ()
        # metrics ref -> (live, memory_total, memory_free, last_updated) / carrier
        self.host_metrics: dict[str, tuple[bool, int, int, Any]] = {}
        self.pif_metrics: dict[str, bool] = {}
        # Raw host and PIF records, to rebuild their rows when only their metrics change.
        self.records: dict[str, dict[str, dict]] = {"host": {}, "pif": {}}
        self.by_metrics: dict[str, dict[str, str]] = {"host": {}, "pif": {}}
        # Foreign keys whose target is not known yet: (class, ref, column) -> target ref, and the reverse.
        self.waiting: dict[tuple[str, str, str], str] = {}
        self.waiters: dict[tuple[str, str], set[tuple[str, str, str]]] = defaultdict(set)

    # -- helpers used by the value functions -------------------------------------------------

    def resolve(self, target: str, ref: Any, cls: str, own_ref: str, column: str) -> int | None:
        """The pk of ``target`` object ``ref``; an unknown ref is remembered to be filled in later."""
        if not ref or ref == NULL_REF:
            row = None
        else:
            row = self.rows[target].get(ref)
            if row is None:
                key = (cls, own_ref, column)
                self.waiting[key] = ref
                self.waiters[(target, ref)].add(key)
                return None
        if self.waiting:
            self.waiting.pop((cls, own_ref, column), None)
        return None if row is None else row[0]

    def _values(self, spec: Spec, ref: str, record: dict) -> dict[str, Any]:
        values = spec.values(self, ref, record)
        for column, limit in spec.truncate.items():
            value = values.get(column)
            if isinstance(value, str) and len(value) > limit:
                values[column] = value[:limit]
        return values

    def _remember_side_record(self, cls: str, ref: str, record: dict) -> None:
        if cls in self.records:
            old = self.records[cls].get(ref)
            if old is not None and old.get("metrics") != record.get("metrics"):
                self.by_metrics[cls].pop(old.get("metrics", ""), None)
            self.records[cls][ref] = record
            metrics = record.get("metrics")
            if metrics and metrics != NULL_REF:
                self.by_metrics[cls][metrics] = ref

    def _forget_side_record(self, cls: str, ref: str) -> None:
        if cls in self.records:
            old = self.records[cls].pop(ref, None)
            if old is not None:
                self.by_metrics[cls].pop(old.get("metrics", ""), None)

    @staticmethod
    def _host_metrics_of(record: dict) -> tuple[bool, int, int, Any]:
        return (to_bool(record.get("live")), to_int(record.get("memory_total")), to_int(record.get("memory_free")),
                to_datetime(record.get("last_updated")))

    def _pool_fields(self, record: dict) -> dict[str, Any]:
        return {
            "uuid": to_str(record.get("uuid")),
            "ref": self.pool_ref,
            "name_label": to_str(record.get("name_label"))[:255],
            "ha_enabled": to_bool(record.get("ha_enabled")),
            "ha_host_failures_to_tolerate": to_int(record.get("ha_host_failures_to_tolerate")),
            "ha_plan_exists_for": to_int(record.get("ha_plan_exists_for")),
            "ha_overcommitted": to_bool(record.get("ha_overcommitted")),
            "ha_allow_overcommit": to_bool(record.get("ha_allow_overcommit")),
            "ha_configuration": to_map(record.get("ha_configuration")),
        }

    def _message(self, cls: str, uuid: str, op: str) -> Message:
        return inventory_change(pool=self.pool.uuid, cls=cls, uuid=uuid, op=op)

    # -- bulk writes ---------------------------------------------------------------------------

    def _upsert(self, spec: Spec, items: list[tuple[str, str, dict[str, Any]]],
                known: dict[str, int] | None = None) -> list[int]:
        """INSERT ... ON CONFLICT (pool, uuid) DO UPDATE for (ref, uuid, values) items; returns their pks.
        ``known``: uuid -> pk of the rows that exist (default: from the in-memory image)."""
        if connection.vendor == "postgresql":
            if known is None:
                rows = self.rows[spec.cls]
                known = {rows[ref][1]: rows[ref][0] for ref, _uuid, _values in items if ref in rows}
            return _pg_upsert(spec, self.pool.pk, items, known)
        model = spec.model
        pool_id = self.pool.pk
        objs = [model(pool_id=pool_id, uuid=uuid, ref=ref, **values) for ref, uuid, values in items]
        model.objects.bulk_create(objs, batch_size=BATCH_SIZE, update_conflicts=True,
                                  unique_fields=["pool", "uuid"], update_fields=spec.update_fields)
        return [obj.pk for obj in objs]

    def _fill_pending(self, cls: str, added: Iterable[str]) -> list[tuple[str, dict]]:
        """Foreign keys that pointed at objects unknown when written, now that those exist.
        Returns the messages for the rows that changed."""
        updates: dict[tuple[str, str], dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        changed: list[tuple[str, str]] = []
        for ref in added:
            for key in self.waiters.pop((cls, ref), ()):
                if self.waiting.get(key) != ref:
                    continue  # the owner points elsewhere by now
                del self.waiting[key]
                owner_cls, owner_ref, column = key
                owner = self.rows[owner_cls].get(owner_ref)
                if owner is None:
                    continue
                updates[(owner_cls, column)][self.rows[cls][ref][0]].append(owner[0])
                changed.append((owner_cls, owner[1]))
        for (owner_cls, column), by_target in updates.items():
            model = SPEC_BY_CLASS[owner_cls].model
            for target_pk, owner_pks in by_target.items():
                model.objects.filter(pk__in=owner_pks).update(**{column: target_pk})
        # The stored image keeps None for these columns, so the owner's next event rewrites its row: harmless.
        return [self._message(owner_cls, uuid, "mod") for owner_cls, uuid in dict.fromkeys(changed)]

    # -- full sync -----------------------------------------------------------------------------

    def full_sync(self, records: dict[str, dict[str, dict]]) -> SyncResult:
        """Make the pool's rows equal to ``records`` ({event class: {ref: record}}), in one transaction;
        announce ``inventory.resync`` after commit."""
        self._reset()
        pool_records = records.get("pool") or {}
        if not pool_records:
            raise ValueError("the pool answered no pool record")
        self.pool_ref, pool_record = next(iter(pool_records.items()))
        self.master_ref = to_str(pool_record.get("master"))
        for ref, rec in (records.get("host_metrics") or {}).items():
            self.host_metrics[ref] = self._host_metrics_of(rec)
        for ref, rec in (records.get("pif_metrics") or {}).items():
            self.pif_metrics[ref] = to_bool(rec.get("carrier"))

        result = SyncResult()
        pool = self.pool
        now = timezone.now()
        with transaction.atomic():
            pool_fields = self._pool_fields(pool_record)
            if pool.uuid and pool.uuid != pool_fields["uuid"]:
                log.warning("pool %s: the pool at %s now has uuid %s (was %s); replacing its inventory",
                            pool.name, pool.master_url or pool.url, pool_fields["uuid"], pool.uuid)
            # A pool that gets its uuid (or another one) is one open pages may now show: they join its group.
            new_uuid = pool_fields["uuid"]
            listing = [pools_change(pool=new_uuid, op="add")] if new_uuid and new_uuid != pool.uuid else []
            for name, value in pool_fields.items():
                setattr(pool, name, value)
            pool.last_sync_at = now
            Pool.objects.filter(pk=pool.pk).update(last_sync_at=now, **pool_fields)
            self.pool_values = tuple(pool_fields.values())

            incoming: dict[str, dict[str, str]] = {}  # class -> uuid -> ref
            for spec in SPECS:
                incoming[spec.cls] = {to_str(rec.get("uuid")): ref
                                      for ref, rec in (records.get(spec.cls) or {}).items()}
            # Children first: rows whose object disappeared, and rows whose object got a new ref
            # (a restarted pool): park their ref so that the upsert never collides on (pool, ref).
            known: dict[str, dict[str, int]] = {}  # class -> uuid -> pk of the rows there are
            for spec in reversed(SPECS):
                existing = {}
                known[spec.cls] = {}
                for uuid, pk, ref in spec.model.objects.filter(pool_id=pool.pk).values_list("uuid", "pk", "ref"):
                    existing[uuid] = ref
                    known[spec.cls][uuid] = pk
                wanted = incoming[spec.cls]
                gone = [uuid for uuid in existing if uuid not in wanted]
                if gone:
                    for start in range(0, len(gone), 10_000):
                        spec.model.objects.filter(pool_id=pool.pk, uuid__in=gone[start:start + 10_000]).delete()
                    result.changed += len(gone)
                moved = [uuid for uuid, ref in wanted.items() if uuid in existing and existing[uuid] != ref]
                if moved:
                    spec.model.objects.filter(pool_id=pool.pk, uuid__in=moved).update(
                        ref=Concat(models.Value("stale:"), "uuid")
                    )
            for spec in SPECS:
                cls_records = records.get(spec.cls) or {}
                items = []
                for ref, rec in cls_records.items():
                    self._remember_side_record(spec.cls, ref, rec)
                    items.append((ref, to_str(rec.get("uuid")), self._values(spec, ref, rec)))
                pks = self._upsert(spec, items, known[spec.cls]) if items else []
                rows = self.rows[spec.cls]
                for (ref, uuid, values), pk in zip(items, pks, strict=True):
                    rows[ref] = (pk, uuid, tuple(values.values()))
                self._fill_pending(spec.cls, rows.keys())  # no message: a resync is announced as a whole
                result.counts[spec.cls] = len(items)
                result.changed += len(items)
            emit_many([*listing, inventory_resync(pool=pool.uuid)])
        result.messages = 1
        return result

    # -- events --------------------------------------------------------------------------------

    def apply(self, events: list[dict]) -> SyncResult:
        """Apply one ``event.from`` batch in one transaction; one message per changed object after commit."""
        result = SyncResult()
        # The last event of each object wins (events come oldest first).
        latest: dict[str, dict[str, dict | None]] = defaultdict(dict)  # class -> ref -> record, None = del
        for event in events:
            cls = str(event.get("class", "")).lower()
            if cls not in XAPI_CLASSES:
                continue
            ref = event.get("ref", "")
            if event.get("operation") == "del":
                latest[cls][ref] = None
            else:
                snapshot = event.get("snapshot")
                if isinstance(snapshot, dict):
                    latest[cls][ref] = snapshot
        if not latest:
            return result

        messages: list[tuple[str, dict]] = []
        telemetry: set[tuple[str, str]] = set()  # (class, uuid) of the rows whose change was only in their telemetry
        with transaction.atomic():
            # The pool record: its fields and which host is master.
            touched_hosts: set[str] = set()
            for ref, rec in latest.pop("pool", {}).items():
                if rec is None or (self.pool_ref and ref != self.pool_ref):
                    continue
                self.pool_ref = ref
                new_master = to_str(rec.get("master"))
                if new_master != self.master_ref:
                    touched_hosts.update(r for r in (self.master_ref, new_master) if r)
                    self.master_ref = new_master
                fields = self._pool_fields(rec)
                if tuple(fields.values()) != self.pool_values:
                    self.pool_values = tuple(fields.values())
                    for name, value in fields.items():
                        setattr(self.pool, name, value)
                    Pool.objects.filter(pk=self.pool.pk).update(**fields)
                    messages.append(self._message("pool", self.pool.uuid, "mod"))
                    result.changed += 1

            # Metrics change host and PIF rows: rebuild those rows from their last record.
            touched_pifs: set[str] = set()
            for ref, rec in latest.pop("host_metrics", {}).items():
                if rec is None:
                    self.host_metrics.pop(ref, None)
                else:
                    self.host_metrics[ref] = self._host_metrics_of(rec)
                host_ref = self.by_metrics["host"].get(ref)
                if host_ref:
                    touched_hosts.add(host_ref)
            for ref, rec in latest.pop("pif_metrics", {}).items():
                if rec is None:
                    self.pif_metrics.pop(ref, None)
                else:
                    self.pif_metrics[ref] = to_bool(rec.get("carrier"))
                pif_ref = self.by_metrics["pif"].get(ref)
                if pif_ref:
                    touched_pifs.add(pif_ref)
            for cls, touched in (("host", touched_hosts), ("pif", touched_pifs)):
                for ref in touched:
                    if ref not in latest[cls] and ref in self.records[cls]:
                        latest[cls][ref] = self.records[cls][ref]

            # Deletions, children first.
            for spec in reversed(SPECS):
                changes = latest.get(spec.cls)
                if not changes:
                    continue
                rows = self.rows[spec.cls]
                gone = [ref for ref, rec in changes.items() if rec is None and ref in rows]
                if not gone:
                    continue
                spec.model.objects.filter(pool_id=self.pool.pk, ref__in=gone).delete()
                for ref in gone:
                    _pk, uuid, _values = rows.pop(ref)
                    self._forget_side_record(spec.cls, ref)
                    messages.append(self._message(spec.cls, uuid, "del"))
                result.changed += len(gone)

            # Additions and modifications, parents first.
            for spec in SPECS:
                changes = latest.get(spec.cls)
                if not changes:
                    continue
                rows = self.rows[spec.cls]
                items = []
                ops = []
                for ref, rec in changes.items():
                    if rec is None:
                        continue
                    self._remember_side_record(spec.cls, ref, rec)
                    uuid = to_str(rec.get("uuid"))
                    values = self._values(spec, ref, rec)
                    old = rows.get(ref)
                    if old is not None and old[1] == uuid and old[2] == tuple(values.values()):
                        continue
                    items.append((ref, uuid, values))
                    ops.append("mod" if old is not None else "add")
                    if old is not None and old[1] == uuid and spec.telemetry_only(values, old[2]):
                        telemetry.add((spec.cls, uuid))
                if not items:
                    continue
                pks = self._upsert(spec, items)
                added = []
                for (ref, uuid, values), pk, op in zip(items, pks, ops, strict=True):
                    rows[ref] = (pk, uuid, tuple(values.values()))
                    messages.append(self._message(spec.cls, uuid, op))
                    if op == "add":
                        added.append(ref)
                filled = self._fill_pending(spec.cls, added)
                telemetry.difference_update((cls, uuid) for _group, event in filled
                                            for cls, objects in event["changes"].items() for uuid in objects)
                messages.extend(filled)
                result.changed += len(items)

            now = timezone.now()
            self.pool.last_event_at = now
            Pool.objects.filter(pk=self.pool.pk).update(last_event_at=now)
            for _group, event in messages:
                for cls, objects in event["changes"].items():
                    result.changed_uuids.setdefault(cls, set()).update(objects)
                    judged = {uuid for uuid in objects if (cls, uuid) not in telemetry}
                    if judged:
                        result.judged_uuids.setdefault(cls, set()).update(judged)
            # The batch goes as one message; a burst is cheaper for the pages to reload than to replay.
            if len(messages) > settings.EAC_CHANGE_MESSAGES_MAX:
                messages = [inventory_resync(pool=self.pool.uuid)]
            elif messages:
                messages = [merged_changes(pool=self.pool.uuid, messages=messages)]
            emit_many(messages)
        result.messages = len(messages)
        return result


def fetch_records(client: Any, classes: Iterable[str] = EVENT_CLASSES) -> dict[str, dict[str, dict]]:
    """``get_all_records`` of every class the inventory mirrors: {event class: {ref: record}}."""
    return {cls: client.get_all_records(XAPI_CLASSES[cls], RECORD_FIELDS[cls]) for cls in classes}


# Re-exported: the watcher and the tests know these as inventory.sync's.
__all__ = ["EVENT_CLASSES", "RECORD_FIELDS", "SPECS", "XAPI_CLASSES", "PoolMirror", "SyncResult", "fetch_records"]
