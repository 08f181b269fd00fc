"""`python -m grto_cli`: the same command line as `grto`."""

from grto_cli.cli import app

app(prog_name="grto")
