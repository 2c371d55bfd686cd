"""The data engine's worker: consumes `telemetry.edge` (per-domain signals, rules, triggers) and `tasks.training`
(the triggers' TrainingTask events → task rows).

`python -m workers.telemetry` runs it; the logic is in `workers.telemetry.consumer`, every decision in
`apps.dataengine.services`.
"""
