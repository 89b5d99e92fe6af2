"""WebSocket routes of the inventory (live treeview): see the treeview issue."""
websocket_urlpatterns: list = []
