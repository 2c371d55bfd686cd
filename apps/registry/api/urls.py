"""Routes of the registry API (mounted under /api/v1/)."""

from rest_framework.routers import SimpleRouter

from apps.registry.api.views import AliasViewSet, ModelFamilyViewSet, ModelVersionViewSet

router = SimpleRouter()
router.register("families", ModelFamilyViewSet, basename="family")
router.register("versions", ModelVersionViewSet, basename="version")
router.register("aliases", AliasViewSet, basename="alias")

urlpatterns = router.urls
