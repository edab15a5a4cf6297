"""CLI entry points: one module per ``shadowproxy`` sub-command."""
