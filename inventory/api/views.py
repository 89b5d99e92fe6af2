"""REST endpoints of the inventory: read-only mirrors of XAPI objects, and pool configuration.

Lists select/prefetch what their serializer shows, so a page costs the same
number of queries whatever its size.
"""

from django.db.models import Count, IntegerField, OuterRef, Prefetch, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.response import Response

from eac.errors import client_ip
from eac.permissions import CanViewInventoryOrAdministrator
from inventory import services
from inventory.filtersets import HostFilterSet, NetworkFilterSet, PoolFilterSet, SRFilterSet, VMFilterSet
from inventory.models import PBD, PIF, SR, VBD, VIF, VM, Host, Network, Pool

from . import serializers


def _count(model, **conditions) -> Coalesce:
    """A per-pool row count as a correlated subquery (joins would multiply hosts by VMs)."""
    counted = (
        model.objects.filter(pool=OuterRef("pk"), **conditions)
        .order_by()
        .values("pool")
        .annotate(n=Count("pk"))
        .values("n")
    )
    return Coalesce(Subquery(counted, output_field=IntegerField()), Value(0))


class _DetailViewSetMixin:
    # A lighter serializer and queryset for lists, the full one (with relations) for one object:
    # with every VM's disks and NICs a 100-row page took ~70 ms p50 / ~260 ms p95 at 10,000 VMs
    # (benchmarks/bench_api.py), against a 100 ms p95 budget; the summary rows take ~20 / ~25 ms.
    # (A comment, not a docstring: drf-spectacular would show it on every endpoint.)

    detail_serializer_class = None

    def get_serializer_class(self):
        if self.action == "retrieve" and self.detail_serializer_class is not None:
            return self.detail_serializer_class
        return super().get_serializer_class()

    def get_queryset(self) -> QuerySet:
        queryset = super().get_queryset()
        return self.with_details(queryset) if self.action == "retrieve" else queryset

    def with_details(self, queryset: QuerySet) -> QuerySet:
        return queryset


_WRITE_ERRORS = {400: None, 403: None}
_BEING_REMOVED = {409: OpenApiResponse(description="The pool is being removed: it can no longer be changed")}


@extend_schema_view(
    create=extend_schema(responses={201: serializers.PoolSerializer, **_WRITE_ERRORS}),
    update=extend_schema(responses={200: serializers.PoolUpdateSerializer, 404: None, **_WRITE_ERRORS,
                                    **_BEING_REMOVED}),
    partial_update=extend_schema(responses={200: serializers.PoolUpdateSerializer, 404: None, **_WRITE_ERRORS,
                                            **_BEING_REMOVED}),
    destroy=extend_schema(
        responses={202: OpenApiResponse(serializers.PoolSerializer, description="The pool, marked as being removed"),
                   403: None, 404: None,
                   409: OpenApiResponse(description="Rows that protect the pool from deletion still refer to it")},
        description="Remove the pool and everything mirrored from it (Administrators). Accepted (202): the pool is "
                    "marked as being removed (`removing_since`), its watcher stops and a worker deletes it in bulk; "
                    "it is listed until then, and refuses changes (409). Asking again is harmless (202).",
    ),
)
class PoolViewSet(viewsets.ModelViewSet):
    """Pools the console watches. Adding one, or changing how to reach it, tests the connection first (400 if
    it fails); the password is write-only. Removing one is done by a worker (202)."""

    queryset = Pool.objects.annotate(
        host_count=_count(Host),
        # The VMs the VM list shows by default: no templates, control domains or snapshots.
        vm_count=_count(VM, **dict.fromkeys(VMFilterSet.HIDDEN_BY_DEFAULT.values(), False)),
    ).order_by("name")
    serializer_class = serializers.PoolSerializer
    filterset_class = PoolFilterSet
    permission_classes = [CanViewInventoryOrAdministrator]

    def get_serializer_class(self):
        if self.action in ("update", "partial_update"):
            return serializers.PoolUpdateSerializer
        return super().get_serializer_class()

    def perform_create(self, serializer: serializers.PoolSerializer) -> None:
        serializer.save()
        self._reload(serializer)

    def perform_update(self, serializer: serializers.PoolSerializer) -> None:
        serializer.save()
        self._reload(serializer)

    def destroy(self, request, *args, **kwargs):
        pool = services.pool_remove_request(pool=self.get_object(), requested_by=request.user, via="api",
                                            remote_addr=client_ip(request))
        shown = self.get_queryset().filter(pk=pool.pk).first()
        if shown is None:  # removed already, between the two reads
            raise NotFound()
        return Response(self.get_serializer(shown).data, status=status.HTTP_202_ACCEPTED)

    def _reload(self, serializer: serializers.PoolSerializer) -> None:
        # The service returns a plain Pool; the response shows the counts too.
        serializer.instance = self.get_queryset().get(pk=serializer.instance.pk)


class HostViewSet(_DetailViewSetMixin, viewsets.ReadOnlyModelViewSet):
    """Hosts of the pools; one host's detail shows its PIFs (with carrier) and PBDs."""

    queryset = Host.objects.order_by("name_label", "pk")
    serializer_class = serializers.HostSerializer
    detail_serializer_class = serializers.HostDetailSerializer
    filterset_class = HostFilterSet
    permission_classes = [CanViewInventoryOrAdministrator]

    def with_details(self, queryset: QuerySet) -> QuerySet:
        return queryset.prefetch_related(
            Prefetch("pifs", queryset=PIF.objects.select_related("network")),
            Prefetch("pbds", queryset=PBD.objects.select_related("sr").order_by("sr__name_label", "pk")),
        )


class VMViewSet(_DetailViewSetMixin, viewsets.ReadOnlyModelViewSet):
    """VMs; templates, control domains (dom0) and snapshots only when asked for (see the filters)."""

    queryset = VM.objects.select_related("resident_on").order_by("name_label", "pk")
    serializer_class = serializers.VMSerializer
    detail_serializer_class = serializers.VMDetailSerializer
    filterset_class = VMFilterSet
    permission_classes = [CanViewInventoryOrAdministrator]

    def filter_queryset(self, queryset: QuerySet) -> QuerySet:
        # A template, dom0 or snapshot is hidden from lists, but its own URL still shows it.
        if self.action == "retrieve":
            return queryset
        return super().filter_queryset(queryset)

    def with_details(self, queryset: QuerySet) -> QuerySet:
        return queryset.select_related("affinity").prefetch_related(
            Prefetch("vbds", queryset=VBD.objects.select_related("vdi__sr")),
            Prefetch("vifs", queryset=VIF.objects.select_related("network")),
        )

    @extend_schema(request=serializers.VMPowerSerializer,
                   responses={202: serializers.VMPowerQueuedSerializer, 400: None, 403: None, 404: None,
                              409: OpenApiResponse(description="The VM is not in the power state the action needs")})
    @action(detail=True, methods=["post"])
    def power(self, request, pk=None):
        """Start or cleanly shut down the VM (Administrators). Queued for a worker (202): XAPI may still
        refuse it, and the VM's events (its page, the audit log) then say why."""
        vm = self.get_object()
        data = serializers.VMPowerSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        services.vm_power_request(vm=vm, action=data.validated_data["action"], requested_by=request.user,
                                  via="api", remote_addr=client_ip(request))
        return Response({"vm": vm.pk, "action": data.validated_data["action"], "detail": "Queued for a worker."},
                        status=status.HTTP_202_ACCEPTED)


class SRViewSet(_DetailViewSetMixin, viewsets.ReadOnlyModelViewSet):
    """Storage repositories; one SR's detail shows which hosts have it attached (PBDs)."""

    queryset = SR.objects.order_by("name_label", "pk")
    serializer_class = serializers.SRSerializer
    detail_serializer_class = serializers.SRDetailSerializer
    filterset_class = SRFilterSet
    permission_classes = [CanViewInventoryOrAdministrator]

    def with_details(self, queryset: QuerySet) -> QuerySet:
        return queryset.prefetch_related(
            Prefetch("pbds", queryset=PBD.objects.select_related("host").order_by("host__name_label", "pk"))
        )


class NetworkViewSet(_DetailViewSetMixin, viewsets.ReadOnlyModelViewSet):
    """Networks; one network's detail shows the hosts' PIFs on it."""

    queryset = Network.objects.order_by("name_label", "pk")
    serializer_class = serializers.NetworkSerializer
    detail_serializer_class = serializers.NetworkDetailSerializer
    filterset_class = NetworkFilterSet
    permission_classes = [CanViewInventoryOrAdministrator]

    def with_details(self, queryset: QuerySet) -> QuerySet:
        return queryset.prefetch_related(
            Prefetch("pifs", queryset=PIF.objects.select_related("host").order_by("host__name_label", "device"))
        )
