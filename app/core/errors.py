"""Errors the API turns into 4xx JSON responses: {"detail": "<what is wrong>"}."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.batching import Overloaded
from asif.encoders.images import ImageError
from asif.serving.labels import LabelError
from asif.stores import StoreError, StoreUnavailable


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

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = str(first.get("msg", "invalid request"))
        return JSONResponse({"detail": f"{where}: {msg}" if where else msg}, status_code=422)

    @app.exception_handler(ImageError)
    async def _image_error(_: Request, exc: ImageError) -> JSONResponse:
        return JSONResponse({"detail": f"invalid image: {exc}"}, status_code=400)

    @app.exception_handler(Overloaded)
    async def _overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        return JSONResponse({"detail": f"overloaded: {exc}"}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(StoreError)
    async def _store_error(_: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"detail": f"rejected: {exc}"}, status_code=422)

    @app.exception_handler(StoreUnavailable)
    async def _store_unavailable(_: Request, exc: StoreUnavailable) -> JSONResponse:
        return JSONResponse({"detail": f"unavailable: {exc}"}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(LabelError)
    async def _label_error(_: Request, exc: LabelError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)
