"""Routes of the data engine API (mounted under /api/v1/)."""

from rest_framework.routers import SimpleRouter

from apps.dataengine.api.views import DataEngineRuleViewSet, DataEngineTriggerViewSet, DeviceSignalViewSet

router = SimpleRouter()
router.register("data-engine/signals", DeviceSignalViewSet, basename="data-engine-signal")
router.register("data-engine/rules", DataEngineRuleViewSet, basename="data-engine-rule")
router.register("data-engine/triggers", DataEngineTriggerViewSet, basename="data-engine-trigger")

urlpatterns = router.urls
