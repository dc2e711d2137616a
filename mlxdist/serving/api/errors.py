"""A request the server refuses, and OpenAI's shape for its error body.

APIError itself is format-neutral (status, message, param, code, kind); each API writes it in its
own shape (OpenAI's here).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


class APIError(Exception):
    """A request the server refuses; becomes an error body in the API's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status,
            message,
            param,
            code,
            kind,
        )


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status)


def validation_error(errors: list[dict]) -> APIError:
    """One readable message for pydantic's errors about a request body."""
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ())][1:]  # drop "body"
    if first["type"] == "json_invalid":
        reason = first.get("ctx", {}).get("error", "malformed")
        return APIError(400, f"the request body is not valid JSON: {reason}", code="invalid_json")
    if not loc:
        if first["type"] == "missing":
            return APIError(400, "the request has no body: send a JSON object")
        return APIError(400, "the request body must be a JSON object")
    param = loc[0] + "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in loc[1:])
    messages = [f"{param}: {first['msg']}"]
    if len(errors) > 1:
        messages.append(f"({len(errors) - 1} more problems)")
    return APIError(400, " ".join(messages), param=param)
