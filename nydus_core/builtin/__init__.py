"""Built-in plugins: default behaviour expressed through the public hooks."""
