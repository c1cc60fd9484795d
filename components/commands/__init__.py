"""CLI commands of the pipeline steps (thin: parse options, call the step function, print)."""
