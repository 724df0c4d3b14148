"""Route dependencies as Annotated aliases."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from app.core.errors import ApiError
from app.state import AppState


def get_state(request: Request) -> AppState:
    return request.app.state.asif


State = Annotated[AppState, Depends(get_state)]


def require_write_key(state: State, authorization: Annotated[str | None, Header()] = None) -> None:
    """Write endpoints need 'Authorization: Bearer <ASIF_API_KEY>' when a key is configured."""
    key = state.settings.api_key
    if key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    expected = key.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
        raise ApiError(401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})


WriteAccess = Depends(require_write_key)
