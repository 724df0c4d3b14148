"""Errors the API turns into 4xx JSON responses: {"detail": "<what is wrong>"}."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from asif.images import ImageError
from asif.labels import LabelError


class ApiError(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ImageError)
    async def _image_error(_: Request, exc: ImageError) -> JSONResponse:
        return JSONResponse({"detail": f"invalid image: {exc}"}, status_code=400)

    @app.exception_handler(LabelError)
    async def _label_error(_: Request, exc: LabelError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)
