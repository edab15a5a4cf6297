"""Wiring and control plane: the service, workers and signals, admin listener, promotion."""
