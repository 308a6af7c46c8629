"""Python client SDK for the BLIP caption service (typed API: see protos/)."""
