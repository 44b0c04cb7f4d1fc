"""The HTTP contract: every request and response body and path id as a pydantic model, declared
once, and how a request that breaks it is answered. flask-openapi3 validates requests with the
models and generates the OpenAPI document from them (``ServiceApp``); ``describe_error`` turns a
validation error into the API's one-line ``{"error": "field: reason"}``, and ``api_error`` and
``http_error`` answer the other errors of the contract the same way.

Integers are JSON integers (an integral float such as 10.0 counts, as JSON does not tell them
apart); booleans and strings are never numbers. Path ids are ASCII decimal digits without leading
zeros (``PathIdConverter``), and a body nests at most ``MAX_JSON_DEPTH`` levels.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, NoReturn

from flask import Response, jsonify, request
from flask_openapi3 import OpenAPI
from flask_openapi3.types import ResponseDict
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PlainSerializer,
    StrictBool,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    create_model,
)
from pydantic_core import ErrorDetails, PydanticCustomError, core_schema
from werkzeug.exceptions import HTTPException
from werkzeug.routing import BaseConverter
from werkzeug.wrappers import Response as BaseResponse

from config import MAX_K
from db import BIGINT_MAX


@dataclass(frozen=True)
class IntegerRange:
    """Pydantic metadata: a strict integer in [low, high] (JSON schema integer, minimum, maximum)
    whose errors read 'expected an integer' or 'must be between low and high'."""

    low: int
    high: int

    def __get_pydantic_core_schema__(self, source: Any,
                                     handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        """Strict int with the bounds, wrapped by ``_validate`` for integral floats and wording."""
        bounded = core_schema.int_schema(ge=self.low, le=self.high, strict=True)
        return core_schema.no_info_wrap_validator_function(self._validate, bounded)

    def _validate(self, value: Any, handler: ValidatorFunctionWrapHandler) -> int:
        """Accept an integral float as its int; reword the errors of the strict check."""
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        try:
            return int(handler(value))
        except ValidationError as error:
            if error.errors()[0]["type"] in ("greater_than_equal", "less_than_equal"):
                raise PydanticCustomError("range", "must be between {low} and {high}",
                                          {"low": self.low, "high": self.high}) from None
            raise PydanticCustomError("integer", "expected an integer") from None


RowId = Annotated[int, IntegerRange(0, BIGINT_MAX)]
# A path id as the URL spells it: ASCII digits, no leading zero, at most as long as BIGINT_MAX.
# werkzeug's own int converter takes any Unicode digit ("/jobs/١" was job 1) and "0001".
PATH_ID_PATTERN = f"0|[1-9][0-9]{{0,{len(str(BIGINT_MAX)) - 1}}}"
PathId = Annotated[RowId, WithJsonSchema({"type": "integer", "minimum": 0, "maximum": BIGINT_MAX,
                                          "pattern": f"^({PATH_ID_PATTERN})$"})]
TopK = Annotated[int, IntegerRange(1, MAX_K)]
# Timestamps as PostgreSQL's offset is written by isoformat() (e.g. +00:00, never Z).
Timestamp = Annotated[datetime, PlainSerializer(datetime.isoformat, return_type=str),
                      WithJsonSchema({"type": "string", "format": "date-time"})]
JobStatus = Literal["queued", "running", "done", "failed"]

# Error wording of the built-in checks; the integer types above carry their own.
MESSAGES = {
    "missing": "required",
    "extra_forbidden": "unknown field",
    "model_type": "expected a JSON object",
    "list_type": "expected a non-empty list of integers",
    "too_short": "expected a non-empty list of integers",
    "too_long": "at most {max_length} songs",
    "bool_type": "expected true or false",
}
# Unknown fields are named first, then missing ones, then bad values (in field order).
PRIORITY = {"extra_forbidden": 0, "missing": 1}


def describe_error(error: ValidationError) -> str:
    """``"field: reason"`` for the first problem of a request body, e.g. ``song_ids[3]: ...``."""
    first: ErrorDetails = min(error.errors(), key=lambda item: PRIORITY.get(item["type"], 2))
    location = "".join(f"[{part}]" if isinstance(part, int) else f".{part}"
                       for part in first["loc"]).lstrip(".") or "body"
    template = MESSAGES.get(first["type"])
    reason = template.format(**first.get("ctx", {})) if template else first["msg"]
    return f"{location}: {reason}"


class ErrorBody(BaseModel):
    """Every error: a reason naming the field, or why the service cannot answer."""

    error: str


class Health(BaseModel):
    """The process is alive."""

    status: str


class Ready(BaseModel):
    """The model is loaded and the database answers."""

    status: str
    model_version: str


class RecommendRequest(BaseModel):
    """Enqueue the top-k of a stored playlist."""

    model_config = ConfigDict(extra="forbid")

    playlist_id: RowId
    k: TopK = 10


class JobAccepted(BaseModel):
    """The committed (or already open) job of the playlist; poll /jobs/{job_id}. ``k`` is the k
    the job runs with: a queued job takes the request's k, a running one keeps its own."""

    job_id: int
    status: JobStatus
    playlist_id: int
    k: int


class Job(BaseModel):
    """A job's state."""

    job_id: int
    playlist_id: int
    k: int
    status: JobStatus
    attempts: Annotated[int, Field(ge=0)]
    last_error: str | None
    run_after: Timestamp
    created_at: Timestamp
    updated_at: Timestamp
    finished_at: Timestamp | None


class SongRecommendation(BaseModel):
    """One recommended song with its names (null when the catalog has none)."""

    rank: Annotated[int, Field(ge=1, le=MAX_K)]
    song_id: int
    score: float
    song: str | None
    artist: str | None
    album: str | None


class StoredRecommendations(BaseModel):
    """The stored top-k of a playlist, best first."""

    playlist_id: int
    model_version: str
    created_at: Timestamp
    recommendations: list[SongRecommendation]


class SongsResponse(BaseModel):
    """Top-k for a list of song ids, and the ids the model does not know."""

    model_version: str
    recommendations: list[SongRecommendation]
    unknown_song_ids: list[int]


class SongsRequest(BaseModel):
    """Top-k for these catalog song ids, in playlist order."""

    model_config = ConfigDict(extra="forbid")

    song_ids: Annotated[list[RowId], Field(min_length=1)]
    k: TopK = 10
    exclude_seen: StrictBool | None = Field(
        None, description="leave out the songs already given; when omitted (or null), the "
                          "model's default: excluded unless its training data repeats songs")


@functools.cache
def songs_request(max_song_ids: int) -> type[SongsRequest]:
    """SongsRequest with at most ``max_song_ids`` songs (the MAX_SONG_IDS setting)."""
    song_ids = Annotated[list[RowId], Field(min_length=1, max_length=max_song_ids)]
    return create_model("SongsRequest", __base__=SongsRequest, __doc__=SongsRequest.__doc__,
                        song_ids=(song_ids, ...))


class JobPath(BaseModel):
    """The job id in /jobs/{job_id}."""

    job_id: PathId


class PlaylistPath(BaseModel):
    """The playlist id in /playlists/{playlist_id}/recommendations."""

    playlist_id: PathId


class PathIdConverter(BaseConverter):
    """The ``<id:name>`` route converter: matches PATH_ID_PATTERN only, so any other spelling of
    a number is no route (404), like every other path that names nothing."""

    regex = PATH_ID_PATTERN

    def to_python(self, value: str) -> int:
        """The id as an int (the pattern admits only what int() reads exactly)."""
        return int(value)

    def to_url(self, value: Any) -> str:
        """The id as the pattern spells it."""
        return str(int(value))


# Errors of the routes that take a JSON body; each is {"error": reason}.
ERRORS: ResponseDict = {400: ErrorBody, 401: ErrorBody, 413: ErrorBody, 415: ErrorBody,
                        503: ErrorBody}
TEXT = {"content": {"text/plain": {"schema": {"type": "string"}}}}
DOCUMENT = {"content": {"application/json": {"schema": {"type": "object"}}}}
ENQUEUE_DESCRIPTION = (
    "202 once the job is committed; 404 for a playlist not in the database. A playlist with an "
    "open job gets that job back: a queued one takes this request's k, a running one keeps its "
    "own, and the answer's k is the one the job runs with (request again once it has finished "
    "to get another k).")

# A path id out of range names nothing: 404 with the message of a missing row.
NOT_FOUND = {"JobPath": "job {job_id} not found",
             "PlaylistPath": "no recommendations stored for playlist {playlist_id}"}


class ApiError(Exception):
    """An error answered as JSON ``{"error": message}`` with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        """Remember the status and the message."""
        super().__init__(message)
        self.status = status
        self.message = message


# Deepest nesting a body may have; the models need 2 ({"song_ids": [...]}). Python's parser
# raises RecursionError (a 500) near 1,000 levels, which 2 KB of brackets reach.
MAX_JSON_DEPTH = 32
# A JSON string, possessive so that scanning stays linear; brackets inside strings do not nest.
JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
NOT_BRACKET = re.compile(rb"[^\[\]{}]+")


def json_depth(body: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (exact for valid JSON), in one linear
    pass over the bytes, without parsing them."""
    brackets = NOT_BRACKET.sub(b"", JSON_STRING.sub(b"", body))
    steps = (1 if byte in b"[{" else -1 for byte in brackets)
    return max(itertools.accumulate(steps, initial=0))


def api_error(error: ApiError) -> tuple[Response, int]:
    """JSON body for an ApiError."""
    return jsonify(error=error.message), error.status


def http_error(error: HTTPException) -> BaseResponse:
    """JSON body for werkzeug's HTTP errors (404, 405, 413, ...), keeping their headers."""
    response = error.get_response()
    response.set_data(jsonify(error=(error.name or "error").lower()).get_data())
    response.content_type = "application/json"
    return response


def require_json_object() -> None:
    """Refuse a POST body that is not a JSON object before the models see it (415, 400).

    flask-openapi3 reads the body with ``get_json(silent=True)``, which turns a wrong content
    type into a missing body and parses a JSON string body a second time. The nesting is
    checked before anything parses the body (the size is bounded by MAX_CONTENT_LENGTH).
    """
    if request.method != "POST":
        return
    if not request.is_json:
        raise ApiError(415, "body: expected Content-Type application/json")
    if json_depth(request.get_data(cache=True)) > MAX_JSON_DEPTH:
        raise ApiError(400, f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(request.get_json(silent=True), dict):
        raise ApiError(400, "body: expected a JSON object")


def validation_failed(error: ValidationError) -> NoReturn:
    """flask-openapi3's validation callback: 404 for a path id out of range, else 400."""
    if error.title in NOT_FOUND:
        raise ApiError(404, NOT_FOUND[error.title].format(**(request.view_args or {})))
    raise ApiError(400, describe_error(error))


class ServiceApp(OpenAPI):
    """flask-openapi3's app whose validation errors are this API's: 400 (404 for a path id)
    with one ErrorBody, declared per route where they can happen.

    The library would also document its own error (a list) under 400 on every operation that
    does not declare one; ``generate_spec_json`` drops those.
    """

    def __init__(self, import_name: str, **options: Any) -> None:
        """An OpenAPI app without the docs UI, reporting validation errors as ApiError, with
        the ``<id:...>`` path converter."""
        super().__init__(import_name, doc_ui=False, validation_error_status=400,
                         validation_error_model=ErrorBody,
                         validation_error_callback=validation_failed, **options)
        self.url_map.converters["id"] = PathIdConverter

    def generate_spec_json(self) -> None:
        """Generate the document, then drop the automatic validation responses (and the
        security schemes, null without API_TOKEN, which is not valid OpenAPI)."""
        super().generate_spec_json()
        components = self.spec_json.get("components", {})
        if components.get("securitySchemes") is None:
            components.pop("securitySchemes", None)
        for item in self.spec_json["paths"].values():
            for operation in item.values():
                added = operation["responses"].get(self.validation_error_status, {})
                schema = added.get("content", {}).get("application/json", {}).get("schema", {})
                if schema.get("type") == "array":
                    del operation["responses"][self.validation_error_status]
