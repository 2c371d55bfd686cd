"""`python -m edge_client ...`: the same commands as `fednested tier2 ...`, for devices without the fednested CLI."""

from edge_client.cli import app

app(prog_name="edge_client")
