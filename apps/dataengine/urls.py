"""URL of the console's data-engine page (mounted at /data-engine/)."""

from django.urls import path

from apps.dataengine import views

app_name = "dataengine"

urlpatterns = [path("", views.trigger_list, name="trigger-list")]
