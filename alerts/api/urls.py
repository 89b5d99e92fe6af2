from rest_framework.routers import SimpleRouter

from . import views

router = SimpleRouter()
router.register("alerts", views.AlertViewSet, basename="alert")
router.register("alert-recipients", views.RecipientViewSet, basename="recipient")

urlpatterns = router.urls
