"""The outbox relay: delivers what the control plane wrote to its outbox (bus events, Celery tasks), with retries."""
