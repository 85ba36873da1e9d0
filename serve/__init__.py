"""The HTTP API on Ray Serve: the ASGI app (app.py) and its deployment."""
