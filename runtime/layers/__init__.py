"""Shared model layers: attention behind a backend interface, rotary embedding, norms."""
