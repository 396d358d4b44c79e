"""What a request brings in: its body, read within a size limit and parsed as JSON within a depth
limit, and whole numbers given as query or path values. Every route reads its input here, and
every refusal is a 4xx with a stable code: 413 `payload-too-large`, 400 `invalid-json`,
`json-too-deep`, or the caller's code for a number."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from dispatcher.errors import BadRequest, ErrorCode, PayloadTooLarge

# How deeply a JSON body may nest (a start's `body` is the deepest any route needs).
MAX_JSON_DEPTH = 32


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing (413) anything over `limit` bytes before reading it all."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_object(
    request: Request, limit: int, *, max_depth: int = MAX_JSON_DEPTH
) -> dict[str, Any]:
    """The body as a JSON object (`{}` when empty), within `limit` bytes and `max_depth`."""
    return json_object(await read_body(request, limit), max_depth=max_depth)


def json_object(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """`raw` as a JSON object, `{}` when it is empty or blank; any other JSON value is 400
    `invalid-json`."""
    if not raw.strip():
        return {}
    data = parse_json(raw, max_depth=max_depth)
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", code=ErrorCode.INVALID_JSON)
    return data


def parse_json(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`raw` as JSON: 400 `invalid-json` if it is not JSON (or not UTF-8), `json-too-deep` if
    it nests deeper than `max_depth`, however deep (the parser's own recursion limit included).
    """
    try:
        data = json.loads(raw)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except ValueError:
        raise BadRequest("request body is not valid JSON", code=ErrorCode.INVALID_JSON) from None
    if _depth(data) > max_depth:
        raise _too_deep(max_depth)
    return data


def whole_number(
    value: str | None, *, name: str, minimum: int, maximum: int, default: int, code: ErrorCode
) -> int:
    """A query or path value as a whole number from `minimum` to `maximum` (ASCII digits only:
    no sign, space or fraction), `default` when absent; anything else is 400 `code`."""
    if value is None:
        return default
    # isdigit() alone takes "²" and "٣", which int() refuses or reads; the length check keeps
    # int() off values of thousands of digits.
    if (
        value.isascii()
        and value.isdigit()
        and len(value.lstrip("0")) <= len(str(maximum))
        and minimum <= int(value) <= maximum
    ):
        return int(value)
    raise BadRequest(f"{name} must be a whole number from {minimum} to {maximum}", code=code)


def _too_deep(max_depth: int) -> BadRequest:
    return BadRequest(
        f"request body is nested deeper than {max_depth} levels", code=ErrorCode.JSON_TOO_DEEP
    )


def _depth(value: Any) -> int:
    """How many arrays and objects deep a JSON value nests, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((v, depth + 1) for v in children)
    return deepest
