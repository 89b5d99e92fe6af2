"""Enumerations of the inventory, with their labels (and colours for the UI) in one place."""
from django.db import models


class ConnectionState(models.TextChoices):
    NEW = "new", "Not yet connected"
    CONNECTED = "connected", "Connected"
    RECONNECTING = "reconnecting", "Reconnecting"
    UNREACHABLE = "unreachable", "Unreachable"


class PowerState(models.TextChoices):
    # XAPI's values, as sent on the wire.
    RUNNING = "Running", "Running"
    HALTED = "Halted", "Halted"
    PAUSED = "Paused", "Paused"
    SUSPENDED = "Suspended", "Suspended"
