"""The audit log now belongs to the kernel (``eac.AuditEntry``, same table): drop it from protection's state."""
from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ("protection", "0003_vm_power_audit"),
        ("eac", "0001_auditentry"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name="AuditEntry")],
            database_operations=[],
        ),
    ]
