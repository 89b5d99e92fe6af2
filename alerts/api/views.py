"""REST API of alerts: list, acknowledge, recipients, test mail."""
from drf_spectacular.utils import extend_schema
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied
from rest_framework.response import Response

from eac.errors import client_ip
from eac.permissions import CanAcknowledge, CanView, IsAdministratorOrReadOnly, user_is_administrator

from .. import selectors, services
from ..filtersets import AlertFilterSet
from . import serializers


class AlertViewSet(viewsets.ReadOnlyModelViewSet):
    """Alerts, open and cleared. Administrators and Operators acknowledge them."""

    queryset = selectors.alert_list()
    serializer_class = serializers.AlertSerializer
    filterset_class = AlertFilterSet
    permission_classes = [CanView]

    @extend_schema(request=None, responses={200: serializers.AlertSerializer, 403: None, 404: None})
    @action(detail=True, methods=["post"], permission_classes=[CanAcknowledge])
    def acknowledge(self, request, pk=None):
        alert = services.alert_acknowledge(alert=self.get_object(), user=request.user, via="api",
                                           remote_addr=client_ip(request))
        return Response(serializers.AlertSerializer(alert).data)

    @extend_schema(request=serializers.TestAlertSerializer,
                   responses={202: serializers.TestAlertResultSerializer, 400: None, 403: None})
    @action(detail=False, methods=["post"])
    def test(self, request):
        """Send a test alert mail (to one address, or to every enabled recipient)."""
        if not user_is_administrator(request.user):
            raise PermissionDenied("Only Administrators can send a test alert.")
        data = serializers.TestAlertSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        alert = services.alert_send_test(user=request.user, email=data.validated_data.get("email"), via="api",
                                         remote_addr=client_ip(request))
        recipients = list(alert.deliveries.values_list("email", flat=True))
        return Response({"alert": alert.pk, "recipients": recipients}, status=status.HTTP_202_ACCEPTED)


class RecipientViewSet(viewsets.ModelViewSet):
    """Who gets alert mails, and for which conditions."""

    queryset = selectors.recipient_list()
    serializer_class = serializers.RecipientSerializer
    permission_classes = [IsAdministratorOrReadOnly]

    def perform_create(self, serializer):
        data = serializer.validated_data
        serializer.instance = services.recipient_create(
            email=data["email"], name=data.get("name", ""), conditions=data.get("conditions"),
            enabled=data.get("enabled", True), user=self.request.user, via="api",
            remote_addr=client_ip(self.request),
        )

    def perform_update(self, serializer):
        serializer.instance = services.recipient_update(
            recipient=serializer.instance, user=self.request.user, via="api", remote_addr=client_ip(self.request),
            **serializer.validated_data,
        )

    def perform_destroy(self, instance):
        services.recipient_delete(recipient=instance, user=self.request.user, via="api",
                                  remote_addr=client_ip(self.request))
