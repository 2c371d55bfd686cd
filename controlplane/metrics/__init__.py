"""Prometheus metrics of the control plane's processes (docs/operations/production.md, "Metrics").

`families` declares every metric the processes record as things happen; `database` and `lag` compute gauges when a
scrape asks for them; `web` serves the web server's `/metrics`, `exposition` a worker's own metrics port, and
`celery_signals` times the Celery worker's tasks.
"""
