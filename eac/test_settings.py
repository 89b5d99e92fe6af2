"""Settings for the test suite: PostgreSQL and Redis of the machine, plain HTTP, local secrets.

Every value can still be overridden from the environment (CI, another machine).
"""
import os

os.environ.setdefault("DEBUG", "0")
os.environ.setdefault("EAC_HTTPS", "0")
os.environ.setdefault("EAC_LOCAL_SECRETS", "1")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/1")
os.environ.setdefault("EAC_CHANNEL_PREFIX", f"eactest{os.getpid()}")  # parallel runs never cross-talk
os.environ.setdefault("EAC_MANIFEST_STATIC", "0")

from .settings import *  # noqa: E402,F403
from .settings import LOGGING, STATIC_ROOT  # noqa: E402

STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise warns on every request otherwise

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast user creation in tests
LOGGING["root"]["level"] = os.environ.get("LOG_LEVEL", "WARNING")
