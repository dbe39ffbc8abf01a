from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("idempotency", "0002_partial_indexes"),
    ]

    operations = [
        migrations.AddField(
            model_name="attempt",
            name="liveness_lock",
            field=models.BooleanField(
                default=False,
                help_text=(
                    "Set once the attempt holds its PostgreSQL session advisory lock (idempotency.liveness): "
                    "while its lease is live, a claimer that finds that lock free knows the holder's session "
                    "ended (the process died) and takes over at once. Unset: only the lease says."
                ),
            ),
        ),
    ]
