import pytest
from django.contrib.auth.models import Permission

from tests.browser_support import PASSWORD


@pytest.fixture
def operator(django_user_model):
    """The user the browser tests log in as (``browser_support.login``'s default): may see the inventory."""
    user = django_user_model.objects.create_user("operator", password=PASSWORD)
    user.user_permissions.add(Permission.objects.get(codename="view_pool", content_type__app_label="inventory"))
    return user
