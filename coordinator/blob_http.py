"""Plain HTTP for policy blobs: GET /blobs/{64 hex digits}, with single byte ranges.

Blobs are immutable and named by their hash, so any cache may keep them forever and a
broken download resumes with `Range: bytes=<received>-` (206 Partial Content). The node
checks each blob's hash itself; this endpoint needs no authentication.
"""

from __future__ import annotations

import re

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from coordinator.blobstore import BlobStore, UnknownBlobError, parse_blob_hex

_SINGLE_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
# Any blob size has fewer digits; a longer number only ever means "past the end".
MAX_RANGE_DIGITS = 19


class RangeNotSatisfiableError(ValueError):
    pass


def _range_number(digits: str) -> int:
    """A number of a Range header, read without converting thousands of digits (which Python
    refuses): one longer than MAX_RANGE_DIGITS counts as 10**MAX_RANGE_DIGITS, past any blob."""
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= MAX_RANGE_DIGITS else 10**MAX_RANGE_DIGITS


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The byte range [start, end) a Range header asks for in a body of `size` bytes; None
    for the whole body (no header, or one this server ignores, as RFC 9110 allows: several
    ranges, other units)."""
    if header is None:
        return None
    match = _SINGLE_RANGE.match(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        suffix_length = _range_number(last)
        if suffix_length == 0:
            raise RangeNotSatisfiableError("an empty suffix range")
        return max(size - suffix_length, 0), size
    start = _range_number(first)
    end = size if not last else min(_range_number(last) + 1, size)
    if last and _range_number(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiableError(f"range starts at {start}, the blob has {size} bytes")
    return start, end


def blob_routes(store: BlobStore) -> list[Route]:
    """The routes, for mounting into a larger app."""

    async def get_blob(request: Request) -> Response:
        try:
            blob_hash = parse_blob_hex(request.path_params["name"])
            size = store.blob_size(blob_hash)
        except UnknownBlobError as error:
            return PlainTextResponse(str(error), status_code=404)
        headers = {
            "Accept-Ranges": "bytes",
            "ETag": f'"{blob_hash.hex()}"',
            "Cache-Control": "public, max-age=31536000, immutable",
        }
        try:
            byte_range = parse_range(request.headers.get("range"), size)
        except RangeNotSatisfiableError as error:
            headers["Content-Range"] = f"bytes */{size}"
            return PlainTextResponse(str(error), status_code=416, headers=headers)
        start, end = byte_range if byte_range is not None else (0, size)
        headers["Content-Length"] = str(end - start)
        status_code = 200
        if byte_range is not None:
            status_code = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        chunks = store.iter_blob_chunks(blob_hash, offset=start, length=end - start)
        return StreamingResponse(
            chunks, status_code=status_code, headers=headers, media_type="application/octet-stream"
        )

    return [Route("/blobs/{name}", get_blob, methods=["GET"])]


def create_blob_app(store: BlobStore) -> Starlette:
    return Starlette(routes=blob_routes(store))
