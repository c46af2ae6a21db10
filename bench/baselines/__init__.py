"""The baselines: tiny apps served exactly like the services (shared.http.server.serve, the same settings)."""
