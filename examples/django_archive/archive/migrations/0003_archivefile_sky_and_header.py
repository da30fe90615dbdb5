from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("archive", "0002_archivefile_prediction_set")]

    operations = [
        migrations.AddField(model_name="archivefile", name="ra", field=models.FloatField(blank=True, null=True)),
        migrations.AddField(model_name="archivefile", name="dec", field=models.FloatField(blank=True, null=True)),
        migrations.AddField(model_name="archivefile", name="header", field=models.JSONField(blank=True, null=True)),
        migrations.AddIndex(model_name="archivefile",
                            index=models.Index(fields=["ra", "dec"], name="archive_arc_ra_3ffe57_idx")),
    ]
