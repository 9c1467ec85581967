"""Serving: the model bundle and the predictor shared by the CLI, the Python API and (later) the server."""
