from django.apps import AppConfig


class PipelineOpsConfig(AppConfig):
    name = "pipeline_ops"
    verbose_name = "Pipelines"
    default_auto_field = "django.db.models.BigAutoField"
