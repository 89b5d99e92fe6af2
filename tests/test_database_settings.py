"""The console's PostgreSQL sessions: no JIT (its reads are short; compiling cost 450 ms of a 35 ms label read once
the tables were analyzed), unless DATABASE_URL's own options say otherwise."""

import subprocess
import sys

import pytest
from django.db import connection

from tests.support import ROOT, subprocess_env


@pytest.mark.django_db
def test_the_consoles_sessions_run_without_jit():
    with connection.cursor() as cursor:
        cursor.execute("SHOW jit")
        assert cursor.fetchone()[0] == "off"  # the server's default is on


def test_options_given_in_the_database_url_are_kept():
    url = subprocess_env()["DATABASE_URL"] + "?options=-c%20statement_timeout%3D5000"
    code = ("from django.db import connection\n"
            "c = connection.cursor()\n"
            "c.execute('SHOW statement_timeout'); print(c.fetchone()[0])\n"
            "c.execute('SHOW jit'); print(c.fetchone()[0])\n")
    result = subprocess.run([sys.executable, "manage.py", "shell", "--no-imports", "-c", code], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env=subprocess_env(DATABASE_URL=url))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["5s", "on"]  # the URL's options replace the default, JIT's too
