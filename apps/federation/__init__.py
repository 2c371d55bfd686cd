"""Federation: edge devices and their enrollment, rounds, training tasks and received edge updates."""
