"""The reconciler's django-q2 schedule: one pass every minute inside the cluster.

Idempotent (update or create by name), reversible (removes it). ``manage.py reconcile
--install-schedule`` repairs it if an operator deleted it.
"""
from django.db import migrations

NAME = "pipeline_ops.reconcile"
FUNC = "pipeline_ops.tasks.reconcile_task"


def install(apps, schema_editor):
    Schedule = apps.get_model("django_q", "Schedule")
    rows = list(Schedule.objects.filter(name=NAME).order_by("pk"))
    if rows:
        Schedule.objects.filter(pk=rows[0].pk).update(func=FUNC, schedule_type="I", minutes=1, repeats=-1)
        Schedule.objects.filter(pk__in=[r.pk for r in rows[1:]]).delete()
    else:
        Schedule.objects.create(name=NAME, func=FUNC, schedule_type="I", minutes=1, repeats=-1)


def uninstall(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name=NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("pipeline_ops", "0001_initial"),
        ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more"),
    ]

    operations = [migrations.RunPython(install, uninstall)]
