"""routes.yaml → frozen settings (file:line errors), durations, presets, the file watcher."""
