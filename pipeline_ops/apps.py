from django.apps import AppConfig


class PipelineOpsConfig(AppConfig):
    name = "pipeline_ops"
    verbose_name = "Pipelines"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Worker readiness reports for the harness that started this cluster; a no-op unless
        # PIPELINE_OPS_READINESS_DIR is set (pipeline_ops.observability.readiness).
        from pipeline_ops.observability.readiness import readiness_connect

        readiness_connect()

        # The running task's queue row, acknowledged in the step's completion (pipeline_ops.delivery).
        from pipeline_ops.delivery import delivery_connect

        delivery_connect()

        # The chaos run's effects log (pipeline_ops.chaos.effects): a no-op unless
        # PIPELINE_OPS_EFFECTS_LOG is set, so production connects nothing.
        from pipeline_ops.chaos.effects import effects_connect

        effects_connect()
