"""`dsv3-export serve`: an OpenAI-compatible HTTP server over continuous batching (docs/serving.md).

`server.app.create_app` is the ASGI app (FastAPI); `serve` runs it under uvicorn in this process,
the scheduler stepping in its own thread. Only the CLI imports this package."""

from dsv3_export.server.app import create_app
from dsv3_export.server.runner import serve

__all__ = ["create_app", "serve"]
