"""The shared library. Never imports grto_cli.cli or grto_cli.stages."""
