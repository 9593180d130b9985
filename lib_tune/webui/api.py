"""HTTP API routes under /tune/v1 (added on app start, also with --nowebui)."""
from . import status as webui_status


def add_routes(app):
    @app.get("/tune/v1/status")
    def tune_status():
        return webui_status.status()
