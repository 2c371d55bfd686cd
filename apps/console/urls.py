"""URLs of the web console, mounted at the site root."""

from django.urls import path

from apps.console import views

app_name = "console"

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("queue/", views.decision_queue, name="queue"),
    path("sign-in/", views.SignInView.as_view(), name="sign-in"),
    path("sign-out/", views.SignOutView.as_view(), name="sign-out"),
    path("versions/<str:version_id>/", views.version_detail, name="version-detail"),
    path("approvals/<int:request_pk>/decide/", views.decide_approval, name="decide-approval"),
    path("approvals/<int:request_pk>/override/", views.gate_override, name="gate-override"),
    path("updates/", views.update_list, name="update-list"),
    path("updates/<str:update_id>/", views.update_detail, name="update-detail"),
    path("audit/", views.audit_log, name="audit-log"),
    path("audit/export.jsonl", views.audit_export, {"kind": "jsonl"}, name="audit-export-jsonl"),
    path("audit/export.csv", views.audit_export, {"kind": "csv"}, name="audit-export-csv"),
]
