"""One module per stage: read config, call core, write outputs and a run record."""
