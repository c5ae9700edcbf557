"""Errors that carry data. One place per surface turns them into output.

- :class:`UserError`: bad input to a command or a configuration file; the CLI prints its message on one
  line of stderr and exits with status 2.
- :class:`ApiError`: bad input or a failure seen by an HTTP client; rendered in the OpenAI error shape
  ``{"error": {"message", "type", "param", "code"}}`` with its HTTP status.
"""

from __future__ import annotations

from typing import Any

# OpenAI's error `type` for each status the gateway and the engines use.
ERROR_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class UserError(Exception):
    """Bad input from a person: a flag, a file, a configuration value. The message names the bad value."""


class ApiError(Exception):
    """An error an HTTP client sees, with its status and the OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return ERROR_TYPE_BY_STATUS.get(self.status, "api_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
