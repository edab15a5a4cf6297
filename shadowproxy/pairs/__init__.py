"""One primary/shadow pair: observations, bodies, comparison, presets, pipeline, redacted record."""
