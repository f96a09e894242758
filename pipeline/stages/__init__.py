"""The stage commands: one thin Typer shell per DVC stage (registered in pipeline/cli.py)."""
