"""Protection pages (under /protection/)."""
from django.urls import path

from . import views

app_name = "protection"

urlpatterns = [
    path("", views.protections, name="protection_list"),
    path("protect/", views.wizard, name="wizard"),
    path("runs/", views.runs, name="runs"),
    path("runs/<int:pk>/", views.run_detail, name="run_detail"),
    path("<int:pk>/unprotect/", views.unprotect, name="unprotect"),
    path("<int:pk>/level2/<slug:action>/", views.level2_action, name="level2_action"),
    path("pools/<int:pk>/plan/", views.pool_plan, name="pool_plan"),
    path("failover-events/", views.failover_events, name="failover_events"),
    path("audit/", views.audit_log, name="audit_log"),
]
