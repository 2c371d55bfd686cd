"""The ingest worker: consumes update envelopes from `updates.experts.local`, checks them, records and buffers them.

`python -m workers.ingest` runs it; the logic is in `workers.ingest.consumer`.
"""
