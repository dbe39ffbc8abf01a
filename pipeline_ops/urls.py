from django.contrib import admin
from django.templatetags.static import static
from django.urls import include, path, reverse_lazy
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from pipeline_ops.observability.health import healthz_view
from pipeline_ops.observability.metrics import metrics_view

urlpatterns = [
    # The site's root is the operators' dashboard (the admin's "View site" link leads here).
    path("", RedirectView.as_view(url=reverse_lazy("admin:pipeline_ops_dashboard")), name="home"),
    # Browsers ask for /favicon.ico whatever the page says.
    path("favicon.ico", RedirectView.as_view(url=static("pipeline_ops/favicon.svg"), permanent=True)),
    path("admin/", admin.site.urls),
    path("healthz", healthz_view, name="healthz"),
    path("metrics", metrics_view, name="metrics"),
    path("api/v1/", include("pipeline_ops.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("api/redoc/", SpectacularRedocView.as_view(url_name="schema"), name="api-redoc"),
]


def handler404(request, exception=None):
    # API clients get problem+json, like every other API error; people get Django's page.
    if request.path.startswith("/api/"):
        from pipeline_ops.api.views import api_not_found

        return api_not_found(request, exception)
    from django.views.defaults import page_not_found

    return page_not_found(request, exception)


def handler500(request):
    if request.path.startswith("/api/"):
        from pipeline_ops.api.views import api_server_error

        return api_server_error(request)
    from django.views.defaults import server_error

    return server_error(request)
