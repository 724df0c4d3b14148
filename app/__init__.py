"""The ASIF REST service (FastAPI). Start it with `asif serve --index DIR`."""
