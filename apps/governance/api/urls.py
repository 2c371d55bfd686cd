"""Routes of the governance API (mounted under /api/v1/)."""

from django.urls import path
from rest_framework.routers import SimpleRouter

from apps.governance.api.views import ApprovalRequestViewSet, AuditEventViewSet, ForgettingReportView

router = SimpleRouter()
router.register("approvals", ApprovalRequestViewSet, basename="approval")
router.register("audit-events", AuditEventViewSet, basename="audit-event")

# The forgetting report is the evidence officers decide on, so governance serves it beside the version's own routes.
urlpatterns = [
    *router.urls,
    path("versions/<str:version_id>/forgetting/", ForgettingReportView.as_view(), name="version-forgetting"),
]
