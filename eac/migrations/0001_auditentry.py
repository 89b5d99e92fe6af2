"""The audit log moves from protection to the kernel: the table stays, only Django's state moves."""
import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):

    initial = True

    dependencies = [
        ("inventory", "0001_initial"),
        ("protection", "0003_vm_power_audit"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="AuditEntry",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False,
                                                   verbose_name="ID")),
                        ("at", models.DateTimeField(auto_now_add=True, db_index=True)),
                        ("username", models.CharField(blank=True, help_text="Kept when the user is deleted",
                                                      max_length=150)),
                        ("action", models.CharField(choices=[('protect', 'Protect requested'), ('unprotect', 'Unprotect requested'), ('protected', 'Protection completed'), ('unprotected', 'Unprotection completed'), ('workflow_failed', 'Workflow failed'), ('set_ftt', 'Host failures to tolerate set'), ('set_ftt_refused', 'Host failures to tolerate refused'), ('alert_ack', 'Alert acknowledged'), ('recipient', 'Alert recipient changed'), ('test_alert', 'Test alert sent'), ('vm_start', 'Start requested'), ('vm_shutdown', 'Shut down requested'), ('vm_power_refused', 'Power action refused')], max_length=32)),
                        ("via", models.CharField(blank=True, help_text="ui, api, websocket or system", max_length=16)),
                        ("remote_addr", models.GenericIPAddressField(blank=True, null=True)),
                        ("object_repr", models.CharField(blank=True, max_length=255)),
                        ("detail", models.JSONField(blank=True, default=dict)),
                        ("pool", models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL,
                                                   related_name="+", to="inventory.pool")),
                        ("user", models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL,
                                                   related_name="+", to=settings.AUTH_USER_MODEL)),
                        ("vm", models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL,
                                                 related_name="+", to="inventory.vm")),
                    ],
                    options={
                        "db_table": "protection_auditentry",
                        "ordering": ["-at", "-id"],
                        "verbose_name_plural": "audit entries",
                    },
                ),
            ],
            database_operations=[],
        ),
    ]
