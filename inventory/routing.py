"""WebSocket routes of the inventory: the live console (treeview, table, detail pages)."""
from django.urls import path

from .consumers import LiveConsumer

websocket_urlpatterns: list = [
    path("ws/live/", LiveConsumer.as_asgi()),
]
