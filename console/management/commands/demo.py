"""`manage.py demo`: the embedded demo, every process of eAC on one machine.

Starts xapisim with the demo preset, registers its pool, and runs the watcher,
a Celery worker, Celery beat and the ASGI web server until Ctrl-C stops them all.
As root, xapisim runs its live test bed (``--live``: hosts as network namespaces with
their Availability Managers, a few VMs as real guests), so that Level 2 can be dialled
and things crashed from the browser; elsewhere, or with ``--no-live``, the pool is
simulated records only. The banner says which.
"""
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from inventory.models import Pool
from inventory.services import pool_create, pool_update

ADMIN_USER = "admin"


class Command(BaseCommand):
    help = "Run the embedded demo: simulated pool, watcher, AM follower, worker, beat and web server."

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=int(os.environ.get("EAC_PORT", 8000)))
        parser.add_argument("--xapisim-port", type=int, default=int(os.environ.get("EAC_XAPISIM_PORT", 8086)))
        parser.add_argument("--no-live", action="store_true", help="simulated records only, even as root")

    def handle(self, *args, port: int, xapisim_port: int, no_live: bool = False, **options):
        self._check_redis()
        call_command("migrate", interactive=False, verbosity=0)
        call_command("collectstatic", interactive=False, verbosity=0)
        password = self._admin_password()
        self.children: list[tuple[str, subprocess.Popen]] = []
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        try:
            sim_password = self._local_secret("xapisim_password")
            sim = [sys.executable, "-m", "xapisim", "--preset", "demo", "--port", str(xapisim_port),
                   "--user", "root", "--password", sim_password]
            live = self._live_bed(sim, no_live)
            if not live:
                self._start("xapisim", sim, wait_for_line="xapisim listening")
            self._register_pool(f"http://127.0.0.1:{xapisim_port}", sim_password)
            manage = [sys.executable, str(settings.BASE_DIR / "manage.py")]
            self._start("watcher", [*manage, "watch_pools"])
            self._start("follower", [*manage, "follow_ams"])
            celery = [sys.executable, "-m", "celery", "-A", "eac", "--quiet"]
            self._start("worker", [*celery, "worker", "--concurrency", "2", "--loglevel", "WARNING"])
            self._start("beat", [*celery, "beat", "--loglevel", "WARNING",
                                 "--schedule", str(settings.VAR_DIR / "celerybeat-schedule")])
            self._start("web", [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                                "console.asgi:application"])
            self.stdout.write(self.style.SUCCESS(
                f"\neAC is running at http://127.0.0.1:{port}/ — log in as {ADMIN_USER} / {password}\n"
                f"The simulated pool (xapisim) answers at http://127.0.0.1:{xapisim_port}/ "
                f"(fault API under /sim/, see xapisim/README.md). Ctrl-C stops everything.\n"
            ))
            self.stdout.write(self.live_note + "\n")
            self._supervise()
        except KeyboardInterrupt:
            self.stdout.write("\nStopping…")
        finally:
            self._stop_all()

    def _check_redis(self) -> None:
        url = settings.REDIS_URL
        try:
            redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        except redis.RedisError:
            where = urlparse(url)
            raise CommandError(
                f"Redis is not reachable at {where.hostname}:{where.port}: start it (e.g. "
                "`redis-server --daemonize yes` or `sudo apt-get install redis-server`), or set REDIS_URL."
            ) from None

    def _local_secret(self, name: str) -> str:
        path = Path(settings.VAR_DIR) / name
        if not path.exists():
            path.write_text(secrets.token_urlsafe(12))
            path.chmod(0o600)
        return path.read_text().strip()

    def _admin_password(self) -> str:
        password = self._local_secret("admin_password")
        user, _ = get_user_model().objects.get_or_create(username=ADMIN_USER, defaults={"email": "admin@localhost"})
        if not user.check_password(password) or not user.is_superuser:
            user.is_staff = user.is_superuser = True
            user.set_password(password)
            user.save()
        return password

    def _register_pool(self, url: str, password: str) -> None:
        pool = Pool.objects.filter(name="Demo pool").first()
        if pool is None:
            pool_create(name="Demo pool", url=url, username="root", password=password, verify_tls=False)
        elif pool.url != url or pool.password != password:
            pool_update(pool=pool, url=url, username="root", password=password)

    def _live_bed(self, sim: list[str], no_live: bool) -> bool:
        """Start xapisim with its live test bed when this machine can run it; say why not otherwise."""
        if no_live:
            self.live_note = "Live test bed: off (--no-live)."
            return False
        if os.geteuid() != 0 or not (shutil.which("ip") or os.path.exists("/usr/sbin/ip")):
            self.live_note = ("Live test bed: off (it needs root and iproute2 for its network namespaces): the pool "
                              "is simulated records, Level 2 cannot be dialled.")
            return False
        live_dir = settings.VAR_DIR / "live"
        if live_dir.exists():
            shutil.rmtree(live_dir)  # the images and configs of an earlier demo: this one starts afresh
        try:
            self._start("xapisim", [*sim, "--live", "--live-dir", str(live_dir)], wait_for_line="xapisim listening")
        except CommandError:
            for name, proc in self.children:
                if name == "xapisim" and proc.poll() is None:
                    proc.terminate()  # it cleans up what it built
                    proc.wait(30)
            self.children = [(name, proc) for name, proc in self.children if name != "xapisim"]
            self.live_note = (f"Live test bed: off (it did not start here; see {live_dir}): the pool is simulated "
                              "records, Level 2 cannot be dialled.")
            return False
        # The worker drives the hosts' Availability Managers with the bed's token (docs/level2.md).
        os.environ["EAC_AM_TOKEN_FILE"] = str(live_dir / "am" / "mgmt.token")
        self.live_note = ("Live test bed: on — each host is a network namespace with its Availability Manager, and "
                          "web-01, web-02, vpn-gw and backup-proxy run as real guests (xapisim/README.md, “Live "
                          "mode”).")
        return True

    def _start(self, name: str, argv: list[str], wait_for_line: str | None = None) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(argv, cwd=settings.BASE_DIR, env=env,
                                stdout=subprocess.PIPE if wait_for_line else None, text=True)
        self.children.append((name, proc))
        if wait_for_line:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                if wait_for_line in line:
                    return
                if not line and proc.poll() is not None:
                    break
            raise CommandError(f"{name} did not start (is port already in use?)")

    def _supervise(self) -> None:
        while True:
            for name, proc in self.children:
                if proc.poll() is not None:
                    raise CommandError(f"{name} stopped (exit code {proc.returncode}); stopping the demo")
            time.sleep(1)

    def _stop_all(self) -> None:
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in self.children:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
