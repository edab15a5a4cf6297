"""shadowproxy: serve from the primary model, mirror to shadows, compare, record, promote."""

__version__ = "0.1.0"
