"""Built-in registry credential providers, in priority order: snapshot labels, then the docker config."""
