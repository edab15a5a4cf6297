"""Prometheus metrics and structured logs. Imports only shadowproxy.base."""
