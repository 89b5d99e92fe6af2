"""WebSocket routes of every app."""
from inventory.routing import websocket_urlpatterns as inventory_routes
from protection.routing import websocket_urlpatterns as protection_routes

websocket_urlpatterns: list = [*inventory_routes, *protection_routes]
