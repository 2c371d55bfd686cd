"""Routes of the governance API (mounted under /api/v1/)."""

from rest_framework.routers import SimpleRouter

from apps.governance.api.views import ApprovalRequestViewSet, AuditEventViewSet

router = SimpleRouter()
router.register("approvals", ApprovalRequestViewSet, basename="approval")
router.register("audit-events", AuditEventViewSet, basename="audit-event")

urlpatterns = router.urls
