"""How the playground's API reads a request body and refuses one: only a JSON object
comes in, and a refusal goes out as one JSON sentence with status 400.

Kept apart from the handlers so every endpoint parses and refuses the same way.
"""

from __future__ import annotations

import json

from aiohttp import web


class BadRequest(web.HTTPBadRequest):
    def __init__(self, message: str) -> None:
        super().__init__(text=f'{{"error": {json_str(message)}}}', content_type="application/json")


def json_str(s: str) -> str:
    """``s`` as a JSON string, non-ASCII kept as it is."""
    return json.dumps(s, ensure_ascii=False)


def _no_constants(name: str) -> None:
    # Python's json accepts NaN and Infinity, which are not JSON and never a valid value
    raise BadRequest(f"the request body contains {name}, which is not a JSON number")


async def json_body(request: web.Request) -> dict:
    """The request's JSON object ({} without a body); anything else is a `BadRequest`."""
    if not request.can_read_body:
        return {}
    try:
        body = json.loads(await request.text(), parse_constant=_no_constants)
    except ValueError:
        raise BadRequest("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


__all__ = ["BadRequest", "json_body", "json_str"]
