"""Test support: isolated broker/database per run, service processes, and small helpers."""
