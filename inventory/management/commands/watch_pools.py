"""``manage.py watch_pools``: keep every pool's inventory in sync with XAPI (the watcher process)."""
import logging
import signal
import threading

from django.core.management.base import BaseCommand, CommandError

from inventory.models import Pool
from inventory.watcher import Supervisor, sync_once
from inventory.xapi import XapiError

log = logging.getLogger("inventory.watcher")


class Command(BaseCommand):
    help = "Watch every registered pool (or those named with --pool): full sync, then follow XAPI events."

    def add_arguments(self, parser):
        parser.add_argument("--pool", action="append", default=[], metavar="NAME",
                            help="watch only this pool (repeatable)")
        parser.add_argument("--once", action="store_true", help="full sync of each pool, then exit")
        parser.add_argument("--poll", type=float, default=3.0, metavar="SECONDS",
                            help="how often the list of pools is reread (default 3)")

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
