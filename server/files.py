"""Routes of the Files API: `POST /v1/files` (multipart: `file`, `purpose` and optionally
`expires_after`), list, retrieve, content and delete. The orchestrator's `FileService`
keeps them."""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable
from urllib.parse import unquote

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message

from orchestrator import FileService
from orchestrator.files import PURPOSES, FileExpiry
from orchestrator.items import item_list
from server.access import owner
from server.errors import APIError, invalid
from server.filenames import SEPARATORS, checked_filename
from server.request_body import content_length
from server.responses import product
from server.responses_protocol import parse_page

# Room for the multipart envelope (boundaries, headers, the purpose field) beyond the file.
MULTIPART_OVERHEAD = 64 * 1024

# OpenAI's bounds on a file's `expires_after.seconds`: one hour to 30 days.
MIN_EXPIRY_SECONDS, MAX_EXPIRY_SECONDS = 3600, 2_592_000
# `expires_after` as form fields, as the SDKs encode a nested object: `expires_after[anchor]`.
EXPIRY_FIELDS = {"expires_after[anchor]": "anchor", "expires_after[seconds]": "seconds"}

# The file part's Content-Type, as the store keeps it (`files.content_type` holds 128
# characters) and the content route sends it back: printable ASCII, as a header value.
MAX_CONTENT_TYPE = 128
_CONTENT_TYPE = re.compile(rf"[\x20-\x7e]{{1,{MAX_CONTENT_TYPE}}}")


def _files(request: Request) -> FileService:
    service = product(request).files
    if service is None:
        raise APIError(404, "this server stores no files (it has no data directory)")
    return service


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the file is larger than this server accepts ({limit} bytes; see --max-upload-mb)",
        param="file",
        code="file_too_large",
    )


def _capped(request: Request, limit: int) -> Request:
    """The request with its body refused (413) as it streams in, once past `limit` bytes.
    The form parser spools a file to a temporary file on disk with no bound of its own,
    so a body sent without a Content-Length (chunked) would otherwise be written out
    whole, however large, before the file's size could be checked."""
    received = 0

    async def receive() -> Message:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit + MULTIPART_OVERHEAD:
                raise _too_large(limit)
        return message

    return Request(request.scope, receive)


def _refuse_other_fields(names: Iterable[str]) -> None:
    """A 400 naming the first form field other than `file`, `purpose` and the fields of
    `expires_after`, as for a JSON body's unknown field. A nested field comes as
    `expires_after[anchor]` (the SDKs' form encoding): an unknown one of `expires_after`
    is named as `expires_after.<key>`, one of another object by its top field."""
    for name in names:
        field, _, rest = name.partition("[")
        if field == "expires_after" and name not in EXPIRY_FIELDS:
            param = f"expires_after.{rest.rstrip(']')}" if rest else field
            raise invalid(
                f"{param}: expires_after takes the fields anchor and seconds "
                "(form fields expires_after[anchor] and expires_after[seconds])",
                param,
            )
        if field not in ("file", "purpose", "expires_after"):
            raise invalid(f"{field} is not supported by this server", field)


def _expiry(form: FormData) -> FileExpiry | None:
    """OpenAI's `expires_after` of a file, `{"anchor": "created_at", "seconds":
    3600..2592000}`, from its form fields (None when neither is sent); a 400 naming the
    field that is missing or wrong."""
    values = {key: form.get(name) for name, key in EXPIRY_FIELDS.items()}
    if all(value is None for value in values.values()):
        return None
    if values["anchor"] != "created_at":
        raise invalid("expires_after.anchor must be 'created_at'", "expires_after.anchor")
    seconds = values["seconds"]
    if (
        isinstance(seconds, str)
        and re.fullmatch(r"[0-9]{1,8}", seconds)
        and MIN_EXPIRY_SECONDS <= int(seconds) <= MAX_EXPIRY_SECONDS
    ):
        return FileExpiry(int(seconds))
    raise invalid(
        f"expires_after.seconds must be an integer from {MIN_EXPIRY_SECONDS} (one hour) to "
        f"{MAX_EXPIRY_SECONDS} (30 days)",
        "expires_after.seconds",
    )


async def _upload(request: Request, limit: int) -> tuple[UploadFile, str, FileExpiry | None, bytes]:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(
            415,
            "POST /v1/files takes multipart/form-data with 'file' and 'purpose'",
            code="unsupported_media_type",
        )
    length = content_length(request)
    if length is not None and length > limit + MULTIPART_OVERHEAD:
        raise _too_large(limit)
    async with _capped(request, limit).form(max_files=1, max_fields=8) as form:
        _refuse_other_fields(form.keys())
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise invalid("file is required (a multipart file field)", "file")
        if not isinstance(purpose, str) or purpose not in PURPOSES:
            raise invalid(f"purpose must be one of {', '.join(PURPOSES)}", "purpose")
        expiry = _expiry(form)
        if upload.size is not None and upload.size > limit:
            raise _too_large(limit)
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise _too_large(limit)
    return upload, purpose, expiry, data


# RFC 5987's extended parameter in a part's Content-Disposition:
# `filename*=charset'language'percent-encoded-bytes` (the charset and the bytes captured).
_EXTENDED_FILENAME = re.compile(
    r";\s*filename\*\s*=\s*\"?([^'\";\s]*)'[^'\";\s]*'([^\";\s]+)", re.IGNORECASE
)


# The charsets of RFC 5987 (as Python's codecs name them): any other name is Python's own
# codec, not a charset (`unicode_escape`, `undefined`, which fails with a UnicodeError).
_EXTENDED_CHARSETS = ("utf-8", "iso8859-1")


def _extended_filename(upload: UploadFile) -> str | None:
    """The name in the part's `filename*` (RFC 5987), or None when it has none, one not of
    that form, one of another charset, or one that does not decode. The multipart parser
    ignores that parameter (RFC 7578 forbids it in forms), but .NET's HttpClient, and so
    OpenAI's .NET SDK, sends a name outside ASCII there, beside a `filename` holding a MIME
    encoded word (`=?utf-8?B?...?=`); RFC 6266 has a recipient prefer `filename*`."""
    match = _EXTENDED_FILENAME.search(upload.headers.get("content-disposition", ""))
    if match is None:  # none, or not of that form (no charset and language, no name)
        return None
    charset, encoded = match.groups()
    try:
        if codecs.lookup(charset).name not in _EXTENDED_CHARSETS:
            return None
        return unquote(encoded, encoding=charset, errors="strict")
    except (LookupError, UnicodeDecodeError):
        return None


def _content_type(upload: UploadFile) -> str | None:
    """The content type the client declared for its file (None: none), or a 400 on `file`
    for one that could be neither stored nor sent back: a control character (a NUL, which
    PostgreSQL cannot store, or another, which no header may hold), a byte outside ASCII,
    or more than MAX_CONTENT_TYPE characters."""
    declared = upload.content_type
    if not declared or _CONTENT_TYPE.fullmatch(declared):
        return declared or None
    raise invalid(
        f"the file's content type must be at most {MAX_CONTENT_TYPE} printable ASCII "
        "characters (a media type, such as text/plain)",
        "file",
    )


def _form_filename(upload: UploadFile) -> str:
    """The name a client gave its file: its last path part (after a `/` or a `\\`, as a
    client on Windows may send its file's whole path), from `filename*` when the part
    has one that decodes, else from `filename`, with the `"` that HTML's multipart
    encoding (browsers, httpx and so the openai SDK) sends there as `%22` restored. Only
    that escape is undone: a CR or LF (`%0D`, `%0A`) has no place in a file name.
    A name `checked_filename` refuses is a 400."""
    extended = _extended_filename(upload)
    raw = extended if extended is not None else (upload.filename or "").replace("%22", '"')
    name = re.split(f"[{re.escape(SEPARATORS)}]", raw)[-1]
    if not name:
        raise invalid("file must have a filename", "file")
    return checked_filename(name, "file")


async def create_file(request: Request) -> Response:
    service = _files(request)
    upload, purpose, expiry, data = await _upload(
        request, request.app.state.tokenmill.config.max_upload_bytes
    )
    filename, content_type = _form_filename(upload), _content_type(upload)
    return JSONResponse(
        await service.create(owner(request), filename, purpose, data, content_type, expiry)
    )


# OpenAI's files list takes up to 10,000 per page, and that is its default.
FILES_PAGE = 10_000


async def list_files(request: Request) -> Response:
    purpose = request.query_params.get("purpose")
    if purpose is not None and purpose not in PURPOSES:
        raise invalid(f"purpose must be one of {', '.join(PURPOSES)}", "purpose")
    page = parse_page(request.query_params, most=FILES_PAGE, default=FILES_PAGE)
    return JSONResponse(item_list(await _files(request).list(owner(request), page, purpose)))


async def retrieve_file(request: Request) -> Response:
    return JSONResponse(
        await _files(request).retrieve(owner(request), request.path_params["file_id"])
    )


async def file_content(request: Request) -> Response:
    """The bytes with the content type they were uploaded with, as it was sent: set as a
    media type, a `text/*` type would gain a `charset=utf-8` the file may not be in (a
    Latin-1 or UTF-16 text file then reads as mojibake). A file of none, or of one an
    earlier version kept that no header may hold (`_content_type` refuses it now), is
    sent as bytes of no declared type."""
    _, content_type, data = await _files(request).content(
        owner(request), request.path_params["file_id"]
    )
    if not content_type or not _CONTENT_TYPE.fullmatch(content_type):
        content_type = "application/octet-stream"
    return Response(data, headers={"content-type": content_type})


async def delete_file(request: Request) -> Response:
    return JSONResponse(
        await _files(request).delete(owner(request), request.path_params["file_id"])
    )
