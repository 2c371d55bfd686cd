"""URL routes: the web console at /, admin, the REST API under /api/v1/ (one router per app), its OpenAPI schema and
Swagger UI."""

from django.contrib import admin
from django.urls import URLPattern, URLResolver, include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from controlplane.metrics.web import metrics_view

api_v1: list[URLPattern | URLResolver] = [
    path("", include("apps.accounts.api.urls")),
    path("", include("apps.registry.api.urls")),
    path("", include("apps.federation.api.urls")),
    path("", include("apps.governance.api.urls")),
    path("", include("apps.dataengine.api.urls")),
    path("", include("apps.schedules.api.urls")),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
]

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_v1)),
    # Session login/logout for the browsable API.
    path("api-auth/", include("rest_framework.urls")),
    # Prometheus' scrape of this process; only for the networks and token FEDNESTED_METRICS_* allow.
    path("metrics", metrics_view, name="metrics"),
    path("data-engine/", include("apps.dataengine.urls")),
    path("", include("apps.console.urls")),
]

# Outside the views too, the API answers JSON with a `code`, the console plain pages; never a debug page.
handler400 = "controlplane.api_errors.bad_request"
handler403 = "controlplane.api_errors.permission_denied"
handler404 = "controlplane.api_errors.page_not_found"
handler500 = "controlplane.api_errors.server_error"
