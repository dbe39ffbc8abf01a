from django.apps import AppConfig


class PipelineOpsConfig(AppConfig):
    name = "pipeline_ops"
    verbose_name = "Pipelines"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The chaos run's effects log (pipeline_ops.chaos.effects): a no-op unless
        # PIPELINE_OPS_EFFECTS_LOG is set, so production connects nothing.
        from pipeline_ops.chaos.effects import effects_connect

        effects_connect()
