"""WebSocket routes of protection: workflow progress (and protect/unprotect for Administrators)."""
from django.urls import path

from .consumers import ProtectionConsumer

websocket_urlpatterns: list = [
    path("ws/protection/", ProtectionConsumer.as_asgi()),
]
