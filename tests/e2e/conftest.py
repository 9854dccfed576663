"""End-to-end tests run a real server: `from live import live_server` (see tests/live.py)."""
