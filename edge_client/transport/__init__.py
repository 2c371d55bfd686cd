"""How the edge client talks to the outside: REST for enrollment, artifacts and payloads, the bus for events,
and one retry policy for both. Every send passes the sidecar first."""
