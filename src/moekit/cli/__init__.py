"""Command-line interface: the only reader of argv, environment and devices."""
