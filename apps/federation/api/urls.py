"""Routes of the federation API (mounted under /api/v1/)."""

from django.urls import path
from rest_framework.routers import SimpleRouter

from apps.federation.api.views import (
    EdgeDeviceViewSet,
    EnrollmentTokenViewSet,
    EnrollView,
    PrivacyLedgerView,
    RoundViewSet,
    TrainingTaskViewSet,
    UpdateViewSet,
)

router = SimpleRouter()
router.register("devices", EdgeDeviceViewSet, basename="device")
router.register("enrollment-tokens", EnrollmentTokenViewSet, basename="enrollment-token")
router.register("rounds", RoundViewSet, basename="round")
router.register("tasks", TrainingTaskViewSet, basename="task")
router.register("updates", UpdateViewSet, basename="update")

urlpatterns = [
    path("enroll/", EnrollView.as_view(), name="enroll"),
    path("privacy/", PrivacyLedgerView.as_view(), name="privacy-ledger"),
    *router.urls,
]
