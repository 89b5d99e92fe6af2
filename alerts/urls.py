"""Alerts pages (under /alerts/)."""
from django.urls import path

from . import views

app_name = "alerts"

urlpatterns = [
    path("", views.alert_list, name="alert_list"),
    path("<int:pk>/acknowledge/", views.acknowledge, name="acknowledge"),
    path("recipients/", views.recipients, name="recipients"),
]
