"""The console's URLs: every app's pages and API (the composition root; settings name it)."""
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

api_v1 = [
    path("", include("inventory.api.urls")),
    path("", include("protection.api.urls")),
    path("", include("alerts.api.urls")),
]

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_v1)),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("protection/", include("protection.urls")),
    path("alerts/", include("alerts.urls")),
    path("", include("console.page_urls")),
]
