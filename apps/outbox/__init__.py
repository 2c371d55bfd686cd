"""Transactional outbox: what the control plane must tell the outside world, written in the transaction that makes
the change and delivered afterwards by the relay (`python -m workers.relay`)."""
