"""The exception that ends a simulator request with an error answer; the state and the endpoints both raise it."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class ApiError(Exception):
    """Ends a request with an error answer, by default in Bolna's `{"error", "message"}` shape."""

    def __init__(
        self, status: int, message: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.headers = headers or {}
        self.status = status
        self.body = body if body is not None else {"error": status, "message": message}

    @classmethod
    def invalid(cls, exc: ValidationError) -> ApiError:
        """A 400 naming every field pydantic refused, `field: problem; ...`."""
        message = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
        )
        return cls(400, message)
