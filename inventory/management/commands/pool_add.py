"""``manage.py pool_add NAME --url URL --user USER``: register a pool (the password from
EAC_POOL_PASSWORD, else asked for without echo)."""
import getpass
import os

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from inventory.services import pool_create
from inventory.xapi import safe_url


class Command(BaseCommand):
    help = "Register a XenServer / XCP-ng pool; the connection is tested first."

    def add_arguments(self, parser):
        parser.add_argument("name", help="a name for the pool in the console")
        parser.add_argument("--url", required=True, help="URL of the pool master, e.g. https://xcp-master.example.org")
        parser.add_argument("--user", required=True, help="XAPI user name, e.g. root")
        parser.add_argument("--no-verify-tls", action="store_true",
                            help="accept a self-signed TLS certificate")

    def handle(self, *args, **options):
        password = os.environ.get("EAC_POOL_PASSWORD")
        if not password:
            try:
                password = getpass.getpass(f"Password of {options['user']} on {safe_url(options['url'])}: ")
            except (EOFError, KeyboardInterrupt):
                raise CommandError("No password given (set EAC_POOL_PASSWORD or type it at the prompt).") from None
        try:
            pool = pool_create(name=options["name"], url=options["url"], username=options["user"],
                               password=password, verify_tls=not options["no_verify_tls"])
        except ValidationError as exc:
            messages = [m for ms in exc.message_dict.values() for m in ms] if hasattr(exc, "error_dict") \
                else exc.messages
            raise CommandError(" ".join(messages)) from None
        # The console calls the pool by the name given here; XAPI's own name is said only when it differs.
        xapi = f"XAPI name {pool.name_label!r}, " if pool.name_label and pool.name_label != pool.name else ""
        self.stdout.write(f"Added pool {pool.name!r} ({xapi}uuid {pool.uuid}), master at {safe_url(pool.master_url)}.")
