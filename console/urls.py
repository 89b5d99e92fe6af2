"""The console's URLs: every app's pages and API (the composition root; settings name it)."""
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

api_v1 = [
    path("", include("inventory.api.urls")),
    path("", include("protection.api.urls")),
    path("", include("alerts.api.urls")),
]

# Under /api/, a path nothing routes (an id that is not a number) is a 404 in JSON, as the API's own are.
handler404 = "eac.api.page_not_found"

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_v1)),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    # The split view serves Swagger UI's start-up script as a file (?script): the CSP allows no inline script.
    # An HTML page only: OPTIONS would ask its template renderer for metadata it cannot render (a 500).
    path("api/docs/", SpectacularSwaggerSplitView.as_view(url_name="schema", http_method_names=["get", "head"]),
         name="api-docs"),
    path("protection/", include("protection.urls")),
    path("alerts/", include("alerts.urls")),
    path("", include("console.page_urls")),
]
