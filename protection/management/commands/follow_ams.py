"""``manage.py follow_ams``: follow the change feed of every AM in use and read the protections it concerns at
once (protection/follow.py). Stops on SIGTERM or Ctrl-C."""
import contextlib
import signal

from django.core.management.base import BaseCommand

from protection.follow import Follower
from protection.tasks import level2_poll


class Command(BaseCommand):
    help = "Follow the hosts' Availability Managers: a change on one is read at once (Level 2 health)."

    def handle(self, *args, **options):
        follower = Follower(level2_poll.delay)
        signal.signal(signal.SIGTERM, lambda *_: follower.stop.set())
        self.stdout.write("follow_ams: following the AMs of the Level 2 protections", ending="\n")
        self.stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):
            follower.run()
