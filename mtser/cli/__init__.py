"""Thin typer commands: parse arguments, call the library, print. Heavy imports stay inside the commands."""
