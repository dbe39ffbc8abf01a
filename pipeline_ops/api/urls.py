from django.conf import settings
from django.urls import path

from . import views

app_name = "api"

urlpatterns = [
    path("inputs/", views.InputListCreateApi.as_view(), name="input-list"),
    path("inputs/<uuid:input_id>/", views.InputDetailApi.as_view(), name="input-detail"),
    path("inputs/<uuid:input_id>/retry/", views.InputRetryApi.as_view(), name="input-retry"),
    path("inputs/<uuid:input_id>/cancel/", views.InputCancelApi.as_view(), name="input-cancel"),
    path("pipelines/", views.PipelineListApi.as_view(), name="pipeline-list"),
]

if getattr(settings, "PIPELINE_OPS_API_BENCH", False):
    # The benchmark's baseline (bench/api.py): same server, idempotency layer off. Never in production.
    urlpatterns.append(path("_bench/inputs/", views.InputCreateUnguardedApi.as_view(), name="input-create-unguarded"))
