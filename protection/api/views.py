"""REST API of protection: thin views over services and selectors.

Errors a client can cause are 400 (bad input), 403 (not an Administrator) or
409 (the state of the pool refuses it, with the reasons) — never a 500: the services raise
them and ``eac.api.exception_handler`` maps them.
"""
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response
from rest_framework.views import APIView

from eac.audit import audit_list
from eac.errors import client_ip
from eac.permissions import IsAdministratorOrReadOnly
from inventory.models import Pool

from .. import preflight, selectors, services
from ..filtersets import AuditEntryFilterSet, FailoverEventFilterSet, ProtectionFilterSet, WorkflowRunFilterSet
from . import serializers

CONFLICT = OpenApiResponse(serializers.ConflictSerializer, description="Refused as things stand, with reasons")


class ProtectionViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin,
                        viewsets.GenericViewSet):
    """VMs' protections. POST protects (202, the workflow run), DELETE unprotects (202, the run)."""

    queryset = selectors.protection_list()
    serializer_class = serializers.ProtectionSerializer
    filterset_class = ProtectionFilterSet
    permission_classes = [IsAdministratorOrReadOnly]

    @extend_schema(request=serializers.ProtectionCreateSerializer,
                   responses={202: serializers.WorkflowRunSerializer, 400: None, 403: None, 409: CONFLICT})
    def create(self, request):
        data = serializers.ProtectionCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        run = services.protection_start(
            vm=data.validated_data["vm"], level=data.validated_data["level"],
            settings=dict(data.validated_data.get("settings") or {}), requested_by=request.user, via="api",
            remote_addr=client_ip(request),
        )
        return Response(serializers.WorkflowRunSerializer(run, context={"request": request}).data,
                        status=status.HTTP_202_ACCEPTED)

    @extend_schema(responses={202: serializers.WorkflowRunSerializer, 403: None, 404: None, 409: CONFLICT})
    def destroy(self, request, pk=None):
        protection = get_object_or_404(selectors.protection_list(), pk=pk)
        run = services.protection_stop(protection=protection, requested_by=request.user, via="api",
                                       remote_addr=client_ip(request))
        return Response(serializers.WorkflowRunSerializer(run, context={"request": request}).data,
                        status=status.HTTP_202_ACCEPTED)

    @extend_schema(parameters=[serializers.PreflightQuerySerializer],
                   responses={200: serializers.PreflightSerializer, 400: None})
    @action(detail=False, methods=["get"])
    def preflight(self, request):
        """What the wizard checks before protecting, each check in words: agility, capacity and plan, HA state
        (Level 1); the VM's state and disks, the AM pair, memory and storage on the secondary (Level 2)."""
        query = serializers.PreflightQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        data = dict(query.validated_data)
        vm = data.pop("vm")
        level = data.pop("level")
        return Response(preflight.protection_preflight(vm=vm, level=int(level), settings=data))


    def _level2(self, request, pk, action: str):
        protection = get_object_or_404(selectors.protection_list(), pk=pk)
        data = serializers.Level2ActionSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        answer = services.protection_level2_request(
            protection=protection, action=action, disk=data.validated_data.get("disk", ""),
            requested_by=request.user, via="api", remote_addr=client_ip(request))
        return Response(serializers.Level2ActionAnswerSerializer(answer).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: serializers.Level2ActionAnswerSerializer, 400: None, 403: None,
                                            404: None, 409: CONFLICT})
    @action(detail=True, methods=["post"])
    def validate(self, request, pk=None):
        """Level 2: validate the replicas now (POST …/verify on each disk's primary AM); the outcome is the
        protection's ``last_verify``, a mismatch raises the validation alert."""
        return self._level2(request, pk, "validate")

    @extend_schema(request=None, responses={202: serializers.Level2ActionAnswerSerializer, 400: None, 403: None,
                                            404: None, 409: CONFLICT})
    @action(detail=True, methods=["post"])
    def swap(self, request, pk=None):
        """Level 2: the planned role swap of the whole VM, done by a worker as a workflow (its run in the answer):
        the running VM moves live to the host of its copy, the copy waits paused on the host it left, each disk's
        roles and the protection's hosts follow. Refused (409, with why) unless both AMs are connected on both
        links, the VM runs on its primary host, its copy waits paused and no failover happened."""
        return self._level2(request, pk, "swap")

    @extend_schema(request=serializers.Level2ActionSerializer,
                   responses={202: serializers.Level2ActionAnswerSerializer, 400: None, 403: None, 404: None,
                              409: CONFLICT})
    @action(detail=True, methods=["post"])
    def repair(self, request, pk=None):
        """Level 2: a failed disk was replaced: resync it (POST …/disk-repaired on its AM)."""
        return self._level2(request, pk, "repair")


class WorkflowRunViewSet(viewsets.ReadOnlyModelViewSet):
    """Workflow runs and their steps, with progress."""

    queryset = selectors.run_list()
    serializer_class = serializers.WorkflowRunSerializer
    filterset_class = WorkflowRunFilterSet
    permission_classes = [IsAdministratorOrReadOnly]


class FailoverEventViewSet(viewsets.ReadOnlyModelViewSet):
    """Protected VMs lost with their host and restarted by HA: from, to, when, downtime."""

    queryset = selectors.failover_event_list()
    serializer_class = serializers.FailoverEventSerializer
    filterset_class = FailoverEventFilterSet
    permission_classes = [IsAdministratorOrReadOnly]


class AuditEntryViewSet(viewsets.ReadOnlyModelViewSet):
    """Who changed what protection, when and from where."""

    queryset = audit_list()
    serializer_class = serializers.AuditEntrySerializer
    filterset_class = AuditEntryFilterSet
    permission_classes = [IsAdministratorOrReadOnly]


class FailoverPlanView(APIView):
    """A pool's failover plan: configured and tolerable host failures, and which VMs would not restart."""

    permission_classes = [IsAdministratorOrReadOnly]

    @extend_schema(responses={200: serializers.FailoverPlanSerializer, 404: None})
    def get(self, request, pk: int):
        pool = get_object_or_404(Pool, pk=pk)
        return Response(selectors.pool_failover_plan(pool))

    @extend_schema(request=serializers.FailuresToTolerateSerializer,
                   responses={202: serializers.WorkflowRunSerializer, 400: None, 403: None, 409: CONFLICT})
    def put(self, request, pk: int):
        """Set the host failures to tolerate; refused (409) with the reason when the plan cannot meet it."""
        pool = get_object_or_404(Pool, pk=pk)
        data = serializers.FailuresToTolerateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        run = services.pool_failures_to_tolerate_set(
            pool=pool, failures_to_tolerate=data.validated_data["failures_to_tolerate"], requested_by=request.user,
            via="api", remote_addr=client_ip(request),
        )
        return Response(serializers.WorkflowRunSerializer(run, context={"request": request}).data,
                        status=status.HTTP_202_ACCEPTED)


