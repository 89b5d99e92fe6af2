from django.apps import AppConfig


class ConsoleConfig(AppConfig):
    """The pages and the live tree: composes every app; no app imports it."""

    name = "console"
    verbose_name = "Console"
