"""App configuration for apps.dataengine."""

from django.apps import AppConfig


class DataEngineConfig(AppConfig):
    name = "apps.dataengine"
    label = "dataengine"
    verbose_name = "Data engine"
