from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("archive", "0001_initial")]

    operations = [
        migrations.AddField(
            model_name="archivefile",
            name="prediction_set",
            field=models.JSONField(blank=True, null=True),
        ),
    ]
