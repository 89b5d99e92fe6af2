"""Every WebSocket route of the console: the live pages (``/ws/live/``) and workflow progress."""
from django.urls import path

from protection.consumers import ProtectionConsumer

from .consumers import LiveConsumer

websocket_urlpatterns: list = [
    path("ws/live/", LiveConsumer.as_asgi()),
    path("ws/protection/", ProtectionConsumer.as_asgi()),
]
