from django.urls import path

from eac.api import Router

from . import views

router = Router()
router.register("protections", views.ProtectionViewSet, basename="protection")
router.register("workflow-runs", views.WorkflowRunViewSet, basename="workflowrun")
router.register("failover-events", views.FailoverEventViewSet, basename="failoverevent")
router.register("audit-log", views.AuditEntryViewSet, basename="auditentry")

urlpatterns = [
    path("pools/<int:pk>/failover-plan/", views.FailoverPlanView.as_view(), name="pool-failover-plan"),
    *router.urls,
]
