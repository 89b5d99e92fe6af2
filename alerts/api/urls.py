from eac.api import Router

from . import views

router = Router()
router.register("alerts", views.AlertViewSet, basename="alert")
router.register("alert-recipients", views.RecipientViewSet, basename="recipient")

urlpatterns = router.urls
