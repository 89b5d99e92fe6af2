"""WebSocket routes of every app."""
from inventory.routing import websocket_urlpatterns as inventory_routes

websocket_urlpatterns: list = [*inventory_routes]
