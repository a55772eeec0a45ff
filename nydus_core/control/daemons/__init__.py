"""Daemon records, spawn/stop, API client, liveness and recovery (backend-neutral)."""
