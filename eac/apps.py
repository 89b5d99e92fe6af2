from django.apps import AppConfig


class EacConfig(AppConfig):
    """The kernel: no views of its own, but the audit log's model and the receivers of eac.receivers."""

    name = "eac"

    def ready(self) -> None:
        from . import receivers  # needs the auth models: imported once the registry is ready

        receivers.connect()
