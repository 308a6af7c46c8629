"""Modules the gateway shares with the Triton models: `blip-export` copies them next to each `model.py` that
imports them, so they import nothing from this package (the models run in Triton's own Python)."""
