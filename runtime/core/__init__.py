"""Scheduling core: pure Python, never imports torch (tested in milliseconds)."""
