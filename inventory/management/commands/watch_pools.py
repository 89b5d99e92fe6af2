"""``manage.py watch_pools``: keep every pool's inventory in sync with XAPI (the watcher process).

Run as many as you like on the same PostgreSQL: they share the pools, each watched by one of them, and take over
the pools of one that dies within a poll interval (``inventory/watch_lock.py``).
"""
import logging
import signal
import threading

from django.core.management.base import BaseCommand, CommandError

from inventory.models import Pool
from inventory.watcher import Supervisor, sync_once
from inventory.xapi import XapiError

log = logging.getLogger("inventory.watcher")


class Command(BaseCommand):
    help = ("Watch the registered pools (or those named with --pool): full sync, then follow XAPI events. "
            "Several processes on one PostgreSQL database share the pools.")

    def add_arguments(self, parser):
        parser.add_argument("--pool", action="append", default=[], metavar="NAME",
                            help="watch only this pool (repeatable); such a process takes its pools whenever no other "
                                 "process holds them, and takes no share of the others")
        parser.add_argument("--once", action="store_true", help="full sync of each pool, then exit")
        parser.add_argument("--poll", type=float, default=3.0, metavar="SECONDS",
                            help="how often the pools and the other watcher processes are reread (default 3): "
                                 "the pools of a watcher that died are taken over within about that")

    def handle(self, *args, **options):
        names = options["pool"]
        if names:
            missing = sorted(set(names) - set(Pool.objects.filter(name__in=names).values_list("name", flat=True)))
            if missing:
                raise CommandError(f"No pool named {', '.join(missing)}.")
        if options["once"]:
            return self._once(names)
        supervisor = Supervisor(names=names, poll_interval=options["poll"])
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: supervisor.stop())
        supervisor.run()

    def _once(self, names):
        pools = Pool.objects.filter(name__in=names) if names else Pool.objects.all()
        failed = []
        for pool in pools:
            try:
                result = sync_once(pool)
            except XapiError as exc:
                failed.append(pool.name)
                self.stderr.write(f"{pool.name}: {exc.describe()}")
                continue
            counts = ", ".join(f"{n} {cls}" for cls, n in result.counts.items())
            self.stdout.write(f"{pool.name}: synced ({counts})")
        if failed:
            raise CommandError(f"Could not sync {', '.join(failed)}.")
