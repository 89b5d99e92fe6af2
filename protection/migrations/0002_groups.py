"""The two roles of the console as Django groups: Administrators change protection, Operators watch.

Both may see every pool (the inventory's view permission, created here if the post-migrate
signal has not made it yet).
"""
from django.db import migrations


def create_groups(apps, schema_editor):
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    ContentType = apps.get_model("contenttypes", "ContentType")
    pool_type, _ = ContentType.objects.get_or_create(app_label="inventory", model="pool")
    view_pool, _ = Permission.objects.get_or_create(
        content_type=pool_type, codename="view_pool", defaults={"name": "Can view pool"}
    )
    for name in ("Administrators", "Operators"):
        group, _ = Group.objects.get_or_create(name=name)
        group.permissions.add(view_pool)


class Migration(migrations.Migration):
    dependencies = [
        ("protection", "0001_initial"),
        ("inventory", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_groups, migrations.RunPython.noop)]
