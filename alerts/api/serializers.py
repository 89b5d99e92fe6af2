"""REST representations of alerts and recipients."""
from rest_framework import serializers

from ..choices import SUBSCRIBABLE
from ..models import Alert, Recipient


class AlertSerializer(serializers.ModelSerializer):
    condition_label = serializers.CharField(source="get_condition_display", read_only=True)
    acknowledged_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)

    class Meta:
        model = Alert
        fields = ["id", "condition", "condition_label", "state", "object_key", "pool", "pool_name", "host_name",
                  "vm_name", "old_state", "new_state", "message", "clear_message", "downtime_seconds", "details",
                  "raised_at", "last_seen_at", "occurrences", "cleared_at", "acknowledged_by", "acknowledged_at"]
        read_only_fields = fields


class RecipientSerializer(serializers.ModelSerializer):
    conditions = serializers.ListField(
        child=serializers.ChoiceField(choices=[(c.value, c.label) for c in SUBSCRIBABLE]), required=False,
        help_text="Conditions mailed to this recipient (all when left out)",
    )

    class Meta:
        model = Recipient
        fields = ["id", "email", "name", "conditions", "enabled", "created_at"]
        read_only_fields = ["id", "created_at"]
        # Uniqueness is checked by the service (case-insensitively), with a clearer message.
        extra_kwargs = {"email": {"validators": []}}


class TestAlertSerializer(serializers.Serializer):
    email = serializers.EmailField(required=False, help_text="Send to this address only (default: every recipient)")


class TestAlertResultSerializer(serializers.Serializer):
    alert = serializers.IntegerField()
    recipients = serializers.ListField(child=serializers.EmailField())
