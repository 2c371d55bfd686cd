"""The outer loop's schedule: django-celery-beat periodic tasks for core updates, aggregation deadlines and champion
evaluations (issue #9)."""
