"""Built-in image formats (registered as format records)."""
