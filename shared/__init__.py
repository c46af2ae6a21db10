"""Callflow's shared package: everything the services have in common."""
