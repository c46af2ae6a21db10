"""Callflow's services: thin entrypoints into the shared package."""
