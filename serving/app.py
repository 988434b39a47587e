"""The prediction service's HTTP app.

For now it answers health checks and says which models it will serve; the prediction
routes arrive with the gatekeeper and serving issue.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from retrain.config import Settings

__all__ = ["create_app"]


def create_app(settings: Settings) -> Starlette:
    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "models": sorted(settings.models)})

    async def not_yet(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "error": {
                    "code": 501,
                    "message": f"{request.url.path}: predictions are not served yet",
                }
            },
            status_code=501,
        )

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/v1/{path:path}", not_yet, methods=["GET", "POST"]),
        ]
    )
