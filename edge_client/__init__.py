"""fednested edge client: enrolls a device, pulls the champion, trains expert adapters on local data and sends
only adapter deltas, every outbound byte checked by the local sidecar. Installs and runs without Django."""
