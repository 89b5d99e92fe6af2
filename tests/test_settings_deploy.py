"""Production settings pass Django's deployment checklist with no warning at all."""

import os
import subprocess
import sys

from cryptography.fernet import Fernet
from django.core.management.utils import get_random_secret_key

from tests.support import ROOT


def production_env(tmp_path, **extra: str) -> dict[str, str]:
    """What an operator sets, and nothing of the test run's own environment (which turns HTTPS off)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "eac.settings",
        "DEBUG": "0",
        "SECRET_KEY": get_random_secret_key() + get_random_secret_key(),
        "EAC_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "ALLOWED_HOSTS": "eac.example.org",
        "DATABASE_URL": "postgres://eac@db.example.org:5432/eac",
        "REDIS_URL": "redis://redis.example.org:6379/0",
        "EAC_VAR_DIR": str(tmp_path / "var"),
    }
    env.update(extra)
    return env


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_check_deploy_passes_with_no_warnings_on_production_settings(tmp_path):
    result = manage(production_env(tmp_path), "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_check_deploy_flags_debug_left_on(tmp_path):
    # The same check fails when it should: proof the test above runs the real checklist.
    result = manage(production_env(tmp_path, DEBUG="1"), "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode != 0
    assert "security.W018" in result.stdout + result.stderr


def test_production_settings_refuse_to_start_without_a_secret_key(tmp_path):
    env = production_env(tmp_path)
    del env["SECRET_KEY"]
    result = manage(env, "check")
    assert result.returncode != 0
    assert "SECRET_KEY must be set when DEBUG is off" in result.stderr
