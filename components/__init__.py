"""Pipeline steps as plain Python functions (typed config in, files out, metrics back), and the CLI."""
