"""Device identity: the federation's private CA (certificates, CRLs) and the device keys that sign update envelopes."""
