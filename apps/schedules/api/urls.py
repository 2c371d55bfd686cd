"""Routes of the schedules API (mounted under /api/v1/)."""

from rest_framework.routers import SimpleRouter

from apps.schedules.api.views import ScheduleViewSet

router = SimpleRouter()
router.register("schedules", ScheduleViewSet, basename="schedule")

urlpatterns = router.urls
