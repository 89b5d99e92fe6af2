"""eAC settings, all read from the environment (django-environ).

With nothing set, eAC runs as the embedded demo: SQLite under var/, Redis on
127.0.0.1:6379, mail printed to the console. Production sets DEBUG=0 and
SECRET_KEY, EAC_ENCRYPTION_KEY, DATABASE_URL, ALLOWED_HOSTS, EMAIL_URL.
"""
from datetime import timedelta
from pathlib import Path

import environ
from csp.constants import NONE, SELF
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()
# A developer's own overrides (never committed); the environment wins over the file.
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

VAR_DIR = Path(env("EAC_VAR_DIR", default=str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)

DEBUG = env.bool("DEBUG", default=False)
# HTTPS hardening is on in production; the demo and the tests serve plain HTTP on loopback.
HTTPS = env.bool("EAC_HTTPS", default=not DEBUG)


def _local_secret(name: str, make) -> str:
    """A development-only secret kept in var/ (never committed), made on first use."""
    path = VAR_DIR / name
    if not path.exists():
        path.write_text(make())
        path.chmod(0o600)
    return path.read_text().strip()


def _required_secret(var: str, filename: str, make) -> str:
    value = env(var, default="")
    if value:
        return value
    if DEBUG or env.bool("EAC_LOCAL_SECRETS", default=False):
        return _local_secret(filename, make)
    raise ImproperlyConfigured(f"{var} must be set when DEBUG is off")


def _django_key() -> str:
    from django.core.management.utils import get_random_secret_key

    return get_random_secret_key()


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


SECRET_KEY = _required_secret("SECRET_KEY", "secret_key", _django_key)
# Fernet keys (comma-separated; the first encrypts, all decrypt) for stored pool passwords.
EAC_ENCRYPTION_KEYS = _required_secret("EAC_ENCRYPTION_KEY", "encryption_key", _fernet_key).split(",")

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_htmx",
    "channels",
    "django_celery_beat",
    "axes",
    "eac",
    "inventory",
    "protection",
    "alerts",
    "console",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "eac.middleware.ContentSecurityPolicyMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Last, as django-axes asks: it turns a login refused during a lock-out into the lock-out page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "console.urls"
WSGI_APPLICATION = "console.wsgi.application"
ASGI_APPLICATION = "console.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                # The layout around every page (header, tree, live socket), computed only if rendered.
                "console.context_processors.layout",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'eac.sqlite3'}")}
DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("CONN_MAX_AGE", default=0))
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The demo runs web, worker, beat and watcher on one SQLite file: wait for locks, use WAL. Transactions take
    # the write lock when they begin: one that would upgrade a read lock later fails at once with "database is
    # locked" (no waiting is possible then), as beat's first write did while the watcher synced.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"timeout": 20, "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
         "transaction_mode": "IMMEDIATE"}
    )
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # No JIT: the console's reads are short, and once the tables are analyzed their estimates (a 50,000-VM count
    # with an anti-join for Level 2 stand-ins) pass jit_above_cost: compiling took 450 ms of a 35 ms read, on each
    # read of the tree's labels. Options given in DATABASE_URL (?options=...) are kept.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("options", "-c jit=off")
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env("REDIS_URL", default="redis://127.0.0.1:6379/0")

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        # redis-py 8 reads with a 5 s socket timeout by default, the length of channels_redis'
        # blocking receive (BZPOPMIN 5 s): an idle WebSocket consumer then dies with TimeoutError.
        "CONFIG": {
            "hosts": [{"address": REDIS_URL, "socket_timeout": 30}],
            "prefix": env("EAC_CHANNEL_PREFIX", default="eac"),
        },
    }
}

CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "login"

# Login throttling (django-axes): after EAC_LOGIN_FAILURE_LIMIT failed logins for one user name from one
# address, that pair is refused for EAC_LOGIN_LOCKOUT_MINUTES, even with the right password (each further
# try starts the wait again). Administrators see the attempts, and can delete one to lift a lock-out, in
# the admin (Axes). The backend goes first so that a locked-out pair never reaches the password check.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env.int("EAC_LOGIN_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.float("EAC_LOGIN_LOCKOUT_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_CLIENT_IP_CALLABLE = "eac.errors.client_ip"  # the address the audit log records, by the same rule

LANGUAGE_CODE = "en-us"
TIME_ZONE = env("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(env("STATIC_ROOT", default=str(VAR_DIR / "static")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if not DEBUG and env.bool("EAC_MANIFEST_STATIC", default=True)
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = DEBUG

# Mail: smtp://user:pass@host:port, submission://… (STARTTLS), consolemail:// for the demo.
vars().update(env.email_url("EMAIL_URL", default="consolemail://"))
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", default="eac@localhost")
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=10)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    # A view that names no permission (the API root) is for users who may see the inventory, not for any login.
    "DEFAULT_PERMISSION_CLASSES": ["eac.permissions.CanViewInventory"],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 100,
    "DEFAULT_SCHEMA_CLASS": "eac.api.AutoSchema",
    "EXCEPTION_HANDLER": "eac.api.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "eAC API",
    "DESCRIPTION": "Availability console for XenServer / XCP-ng pools.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Anonymous users see nothing but the login page, and a user with no role nothing more: the schema and
    # the docs are for those who may use the API.
    "SERVE_PERMISSIONS": ["eac.permissions.CanViewInventory"],
    # validatorUrl None: Swagger UI would otherwise send the schema to validator.swagger.io.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
    # Tags and operation ids from the path after the version: "vms", "vms_list".
    "SCHEMA_PATH_PREFIX": r"/api/v[0-9]+",
}

# Celery: a task is acknowledged only once it finished, so a worker that dies
# mid-task leaves it to be redelivered; workflows are idempotent and resumable.
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_RESULT_BACKEND = env("CELERY_RESULT_BACKEND", default=REDIS_URL)
# Nothing reads a task's result (the database records every outcome), so none is kept. With results on, every
# send also subscribes to its result's channel, and the first send of a process while Redis is down blocks ~20 s
# in the result backend's reconnect loop (the watcher's thread, a web request) instead of failing at once.
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT", default=3600)}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
# Tests give each run its own queue so parallel runs never take each other's tasks.
CELERY_TASK_DEFAULT_QUEUE = env("CELERY_TASK_DEFAULT_QUEUE", default="celery")
CELERY_TIMEZONE = TIME_ZONE

# Protection workflows: a worker holds a run for EAC_WORKFLOW_LEASE seconds (renewed at every step
# update); once it lapses the beat sweeper hands the run to another worker. A run taken more than
# EAC_WORKFLOW_MAX_CLAIMS times fails (a workflow that keeps killing its worker must not loop).
EAC_WORKFLOW_LEASE = env.float("EAC_WORKFLOW_LEASE", default=120.0)
EAC_WORKFLOW_MAX_CLAIMS = env.int("EAC_WORKFLOW_MAX_CLAIMS", default=5)
EAC_WORKFLOW_STEP_RETRIES = env.int("EAC_WORKFLOW_STEP_RETRIES", default=5)
EAC_WORKFLOW_RETRY_DELAY = env.float("EAC_WORKFLOW_RETRY_DELAY", default=1.0)
# The hosts' Availability Managers (Level 2, docs/level2.md): one management token for every AM of a pool,
# as a file holding it (EAC_AM_TOKEN_FILE, read at each use so it can be rotated) or inline (EAC_AM_TOKEN).
# It goes in the Authorization header only: never in a log line, a page or an API answer.
EAC_AM_TOKEN_FILE = env("EAC_AM_TOKEN_FILE", default="")
EAC_AM_TOKEN = env("EAC_AM_TOKEN", default="")
EAC_AM_TIMEOUT = env.float("EAC_AM_TIMEOUT", default=10.0)  # seconds, per management API call
# How long a Level 2 protection waits for a disk's initial copy to the secondary before it gives up.
EAC_AM_SYNC_TIMEOUT = env.float("EAC_AM_SYNC_TIMEOUT", default=3600.0)
EAC_AM_POLL_INTERVAL = env.float("EAC_AM_POLL_INTERVAL", default=0.5)
# Level 2 component health: how often the beat reads every protection's two AMs, and the timeout of those
# reads (short: a dead host's AM must not hold the poll of the others); how long after a primary host's loss
# the secondary may take to take over before "failover failed"; how often the replicas are validated.
EAC_AM_HEALTH_INTERVAL = env.float("EAC_AM_HEALTH_INTERVAL", default=5.0)
# manage.py follow_ams long-polls each AM's change feed for this long at a time (the AM answers at once when
# something changes): a change is read within a second, the beat above is the safety net.
EAC_AM_FOLLOW_WAIT = env.float("EAC_AM_FOLLOW_WAIT", default=15.0)
EAC_AM_HEALTH_TIMEOUT = env.float("EAC_AM_HEALTH_TIMEOUT", default=3.0)
EAC_L2_FAILOVER_GRACE = env.float("EAC_L2_FAILOVER_GRACE", default=30.0)
# Level 2: start paused again, on its host once it is back, the VM that holds the memory for a takeover
# (protection/failover.py reserve_again). Off: the component stays degraded with its repair, for the operator.
EAC_L2_AUTO_RESERVE = env.bool("EAC_L2_AUTO_RESERVE", default=True)
EAC_AM_VERIFY_INTERVAL = env.float("EAC_AM_VERIFY_INTERVAL", default=86_400.0)
# A protected VM not restarted this long after its host was lost raises "VM failed to restart".
EAC_RESTART_GRACE = env.float("EAC_RESTART_GRACE", default=120.0)
EAC_MAIL_RETRY_DELAY = env.float("EAC_MAIL_RETRY_DELAY", default=5.0)
EAC_MAIL_MAX_ATTEMPTS = env.int("EAC_MAIL_MAX_ATTEMPTS", default=50)
# A pending run or mail not picked up by a worker this long is enqueued again by the beat sweeps.
EAC_WORKFLOW_PENDING_RESEND = env.float("EAC_WORKFLOW_PENDING_RESEND", default=60.0)
EAC_MAIL_RESEND_AFTER = env.float("EAC_MAIL_RESEND_AFTER", default=60.0)
CELERY_BEAT_SCHEDULE = {
    "protection-sweep": {
        "task": "protection.tasks.protection_sweep",
        "schedule": env.float("EAC_SWEEP_INTERVAL", default=15.0),
    },
    "protection-level2-health": {
        "task": "protection.tasks.level2_poll_all",
        "schedule": EAC_AM_HEALTH_INTERVAL,
    },
    "protection-level2-validate": {
        "task": "protection.tasks.level2_validate_all",
        "schedule": EAC_AM_VERIFY_INTERVAL,
    },
    "alerts-delivery-sweep": {
        "task": "alerts.tasks.delivery_sweep",
        "schedule": env.float("EAC_MAIL_SWEEP_INTERVAL", default=30.0),
    },
    # Pool removals whose task was lost (broker down) or failed: queued again.
    "inventory-pool-remove-sweep": {
        "task": "inventory.tasks.pool_remove_sweep",
        "schedule": env.float("EAC_POOL_REMOVE_SWEEP_INTERVAL", default=60.0),
    },
}

# The watcher: how long one event.from call blocks, and the reconnect backoff.
EAC_EVENT_TIMEOUT = env.float("EAC_EVENT_TIMEOUT", default=30.0)
EAC_RECONNECT_MAX_DELAY = env.float("EAC_RECONNECT_MAX_DELAY", default=30.0)
EAC_XAPI_TIMEOUT = env.float("EAC_XAPI_TIMEOUT", default=60.0)
# Above this many changed objects in one batch, pages get one "resync" instead of a message each.
EAC_CHANGE_MESSAGES_MAX = env.int("EAC_CHANGE_MESSAGES_MAX", default=200)

# Cookies: the session's is never readable by scripts; both stay on same-site requests. (The CSRF cookie
# stays readable: Swagger UI reads it to send the token; the console's pages take it from the page.)
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"

# Content-Security-Policy (django-csp): scripts, styles and connections from the console's own origin only,
# nothing inline (htmx is configured in base.html to need neither eval nor inline styles). The middleware
# adds the WebSocket origin of the host serving the page to connect-src. img-src data: is for the SVG
# icons of Swagger UI's and the admin's stylesheets.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "img-src": [SELF, "data:"],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    }
}

if HTTPS:
    SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
    "loggers": {"daphne": {"level": "WARNING"}},
}
