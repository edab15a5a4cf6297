"""Replay recorded requests against a model that missed the traffic."""
