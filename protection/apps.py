from django.apps import AppConfig


class ProtectionConfig(AppConfig):
    name = "protection"
    verbose_name = "Protection"

    def ready(self) -> None:
        from inventory.signals import batch_committed

        from .receivers import on_batch_committed

        # NetBox's pattern: the app built on the inventory listens to it; the inventory knows no app.
        batch_committed.connect(on_batch_committed, dispatch_uid="protection.observe")
