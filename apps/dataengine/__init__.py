"""The data engine: per-device, per-domain signals from telemetry.edge, and the rules that turn them into training
tasks (issue #9)."""
