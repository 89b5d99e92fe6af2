"""What removing a pool deletes, as set-based statements: the plan, built from the models' metadata.

Django's ``Model.delete()`` runs its Collector: it loads every row that a cascade reaches, and every row a
``SET_NULL`` must update, into Python, then deletes and updates them by lists of primary keys. For a pool of
10,000 VMs that is over 100,000 objects and minutes of work (``benchmarks/bench_pool_removal.py``). The plan here
does what the Collector would do, with one ``DELETE ... WHERE <path to the pool> = %s`` per table and one
``UPDATE ... SET <column> = NULL WHERE ...`` per ``SET_NULL`` relation, whatever the pool's size.

The plan follows every relation that leads to a Pool, ``on_delete`` deciding what is done with the rows at the
other end, exactly as the Collector decides it (``tests/inventory/test_pool_removal.py`` checks that both leave the
same rows behind):

- ``CASCADE``: those rows are deleted, and what refers to them is followed in turn (a run's steps);
- ``SET_NULL`` / ``SET_DEFAULT``: the column is updated in bulk (the audit log keeps its lines, an alert its text);
- ``PROTECT`` / ``RESTRICT``: the pool cannot be removed while such rows exist (none does today); the plan checks
  them first and names them in a sentence (RESTRICT, as in Django, lets go of rows a cascade deletes anyway);
- ``DO_NOTHING``: nothing (the database's constraint decides).

Rows are found by their path to the pool (``pool``, ``vm__pool``, ``run__pool``), so a table is deleted before
the tables its paths go through (children first: VBDs before VMs, a run's steps before the run), and a column is
set to NULL before the rows it points at go. Models of the apps above the inventory (protection, alerts) and of
the kernel (the audit log) are found as the Collector finds them, by the relations Django's registry gives a model,
never imported.
"""
from __future__ import annotations

import graphlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from django.db import models
from django.db.models import Q, QuerySet

from .models import Pool

DELETE, SET, REFUSE = "delete", "set", "refuse"


class UnsupportedRelation(Exception):
    """A relation of the data model that no set-based statement can remove (a self-cascade, a callable
    on_delete). None exists today; a model that adds one fails the removal tests, which build the plan, rather
    than a removal in production."""


@dataclass(frozen=True)
class RemovalStep:
    """One statement of the plan: delete ``model``'s rows reached by ``paths``, set ``column`` of those rows to
    ``value`` (SET_NULL, SET_DEFAULT), or refuse the removal while such rows exist (PROTECT, RESTRICT)."""

    action: str
    model: type[models.Model]
    paths: tuple[str, ...]  # lookups from the model to the pool's id, e.g. "pool", "vm__pool", "run__pool"
    column: str = ""  # SET: the foreign key set; REFUSE: the foreign key that protects
    value: object = None
    spared: tuple[str, ...] = ()  # REFUSE (RESTRICT): rows reached by these paths are deleted anyway

    def rows(self, pool_id: int) -> QuerySet:
        where = Q()
        for path in self.paths:
            where |= Q(**{path: pool_id})
        queryset = self.model._base_manager.filter(where)
        if self.spared:
            spared = Q()
            for path in self.spared:
                spared |= Q(**{path: pool_id})
            queryset = queryset.exclude(spared)
        return queryset

    def __str__(self) -> str:
        table = self.model._meta.label
        where = " or ".join(self.paths)
        if self.action == DELETE:
            return f"delete {table} where {where}"
        if self.action == SET:
            return f"set {table}.{self.column} = {self.value!r} where {where}"
        return f"refuse while {table} ({self.column}) where {where}"


def _relations_to(model: type[models.Model]):
    """Foreign keys and one-to-ones pointing at ``model``, hidden ones (``related_name="+"``) included: the
    Collector's own ``get_candidate_relations_to_delete``."""
    return [f for f in model._meta.get_fields(include_hidden=True)
            if f.auto_created and not f.concrete and (f.one_to_one or f.one_to_many)]


def _lookup(field: models.ForeignKey, parent_path: str) -> str:
    """The lookup from the field's model to the pool's id, through the parent the field points at."""
    if parent_path == "pk" and field.target_field.primary_key:
        return field.name  # the column itself: no join
    return f"{field.name}__{parent_path}"


def _chain(model: type[models.Model], path: str) -> list[type[models.Model]]:
    """The models a path goes through, after ``model`` itself: vm__pool from VBD -> [VM, Pool]."""
    chain = []
    for name in path.split("__"):
        if name == "pk":
            break
        model = model._meta.get_field(name).related_model
        chain.append(model)
    return chain


def _on_delete_name(on_delete: Callable) -> str:
    for name in ("CASCADE", "SET_NULL", "SET_DEFAULT", "PROTECT", "RESTRICT", "DO_NOTHING"):
        if on_delete is getattr(models, name):
            return name
    return getattr(on_delete, "__name__", repr(on_delete))


@cache
def removal_plan() -> tuple[RemovalStep, ...]:
    """Every statement that removes a pool with what it holds, in an order that works: the checks first, then
    updates and deletes, children before parents. Built once per process from the installed models."""
    deleted: dict[type[models.Model], list[str]] = {Pool: ["pk"]}
    updates: dict[tuple[type[models.Model], str], tuple[list[str], object]] = {}
    refusals: dict[tuple[type[models.Model], str], list[str]] = {}
    pending: list[tuple[type[models.Model], str, tuple[type[models.Model], ...]]] = [(Pool, "pk", (Pool,))]
    while pending:
        parent, parent_path, ancestors = pending.pop(0)
        for relation in _relations_to(parent):
            field = relation.field
            child = relation.related_model._meta.concrete_model
            path = _lookup(field, parent_path)
            rule = _on_delete_name(field.remote_field.on_delete)
            if rule == "CASCADE":
                if child in ancestors:
                    # Rows cascading to rows of their own table (a tree) need as many statements as the tree
                    # is deep: not a set-based delete. No model of the console does this.
                    raise UnsupportedRelation(f"{child._meta.label}.{field.name} cascades back to its own table")
                if path not in deleted.setdefault(child, []):
                    deleted[child].append(path)
                    pending.append((child, path, (*ancestors, child)))
            elif rule in ("SET_NULL", "SET_DEFAULT"):
                value = None if rule == "SET_NULL" else field.get_default()
                updates.setdefault((child, field.name), ([], value))[0].append(path)
            elif rule in ("PROTECT", "RESTRICT"):
                refusals.setdefault((child, f"{field.name}:{rule}"), []).append(path)
            elif rule != "DO_NOTHING":
                raise UnsupportedRelation(f"{child._meta.label}.{field.name}: on_delete={rule} has no bulk form")

    steps: dict[tuple, RemovalStep] = {}
    # Step -> the steps that must run before it (dicts, not sets: the same plan, in the same order, every time).
    graph: dict[tuple, dict[tuple, None]] = {}
    for model, paths in deleted.items():
        steps[(DELETE, model)] = RemovalStep(DELETE, model, tuple(paths))
        graph[(DELETE, model)] = {}
    for (model, column), (paths, value) in updates.items():
        steps[(SET, model, column)] = RemovalStep(SET, model, tuple(paths), column=column, value=value)
        graph[(SET, model, column)] = {}
    # A step finds its rows through the tables on its paths: those are deleted after it.
    for key, step in steps.items():
        for path in step.paths:
            for through in _chain(step.model, path):
                graph[(DELETE, through)][key] = None
    # Better after the table's own rows of the pool are gone (fewer rows to update), when the order allows it.
    for key in [k for k in steps if k[0] == SET]:
        own = (DELETE, key[1])
        if own in steps:
            graph[key][own] = None
            try:
                graphlib.TopologicalSorter(graph).prepare()
            except graphlib.CycleError:
                del graph[key][own]
    order = list(graphlib.TopologicalSorter(graph).static_order())
    checks = []
    for (model, tag), paths in refusals.items():
        column, rule = tag.split(":")
        spared = tuple(deleted.get(model, ())) if rule == "RESTRICT" else ()
        checks.append(RemovalStep(REFUSE, model, tuple(paths), column=column, spared=spared))
    return (*checks, *(steps[key] for key in order))
