"""Bottom layer: the exception tree, exit codes and owned background tasks. Imports nothing of shadowproxy."""
