from eac.api import RootRouter

from . import views

router = RootRouter()
router.register("pools", views.PoolViewSet)
router.register("hosts", views.HostViewSet)
router.register("vms", views.VMViewSet)
router.register("srs", views.SRViewSet)
router.register("networks", views.NetworkViewSet)

urlpatterns = router.urls
