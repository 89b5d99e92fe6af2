"""The console's own pages: overview, VM table, VM, host and pool pages, tree children."""
from django.urls import path

from . import views

app_name = "console"

urlpatterns = [
    path("", views.home, name="home"),
    path("vms/", views.vm_list, name="vm_list"),
    path("vms/<str:uuid>/", views.vm_detail, name="vm_detail"),
    path("vms/<str:uuid>/power/", views.vm_power, name="vm_power"),
    path("hosts/<str:uuid>/", views.host_detail, name="host_detail"),
    path("pools/<int:pk>/", views.pool_detail, name="pool_detail"),
    path("tree/<str:key>/", views.tree_children, name="tree_children"),
]
