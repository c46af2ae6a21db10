"""Offline stand-in for Bolna's call API and its webhooks, for development and tests."""
