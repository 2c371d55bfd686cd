"""The edge client's error root: the CLI turns any of these into one clear line and a non-zero exit."""


class EdgeClientError(Exception):
    """A problem the device operator can act on; the message says what was wrong, where, and what to do."""
