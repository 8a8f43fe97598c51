"""The OpenAI chat-completions request as pydantic models: what `hybrid serve` accepts, published in /openapi.json.

Strict types (no "5" for 5, no 1 for true), unknown fields ignored, an explicit null the same as leaving the field
out. `parse_body` turns raw bytes into a validated request or an ApiError (400 with an OpenAI error body): JSON
that is not UTF-8, nests deeper than MAX_JSON_DEPTH, holds NaN/Infinity or an integer too long to parse, tool
parameter schemas past their depth/size limits. It is CPU work and runs off the event loop.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

import pydantic_core
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_JSON_DEPTH = 64  # nesting of the whole body
MAX_SCHEMA_DEPTH = 32  # nesting of one tool's `parameters`
MAX_SCHEMA_VALUES = 10_000  # values (objects, arrays, scalars) in one tool's `parameters`
MAX_TOOLS = 128
MAX_STOP = 16
INT64 = 1 << 63


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return AsciiJSONResponse(self.body(), status_code=self.status, headers=self.headers)


class AsciiJSONResponse(JSONResponse):
    """\\u-escapes everything non-ASCII, so an echoed string can never make an error body unencodable."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class Schema(BaseModel):
    """Strict, extra fields ignored, null = absent."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_absent(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


# messages
class TextPart(Schema):
    type: Literal["text"]
    text: str


class ImageURL(Schema):
    url: str
    detail: str | None = None


class ImagePart(Schema):
    type: Literal["image_url", "image"]  # K2's template turns either into its media placeholder
    image_url: ImageURL | None = None


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class FunctionCall(Schema):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Schema):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Schema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    reasoning_content: str | None = None  # assistant, a thinking model's earlier reasoning

    @model_validator(mode="after")
    def _per_role(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a '{self.role}' message needs 'content'" +
                             (" or 'tool_calls'" if self.role == "assistant" else ""))  # fmt: skip
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs 'tool_call_id'")
        return self


# tools
class FunctionDef(Schema):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema object
    strict: bool | None = None

    @model_validator(mode="after")
    def _bounded(self):
        if self.parameters is not None:
            depth, values = json_shape(self.parameters, MAX_SCHEMA_DEPTH)
            if depth > MAX_SCHEMA_DEPTH:
                raise ValueError(f"'parameters' nests deeper than {MAX_SCHEMA_DEPTH} levels")
            if values > MAX_SCHEMA_VALUES:
                raise ValueError(f"'parameters' holds more than {MAX_SCHEMA_VALUES} values")
        return self


class Tool(Schema):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Schema):
    name: str


class NamedToolChoice(Schema):
    type: Literal["function"]
    function: NamedFunction


# the rest of the request
class StreamOptions(Schema):
    include_usage: bool = False


class ResponseFormat(Schema):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatTemplateKwargs(Schema):
    model_config = ConfigDict(strict=True, extra="forbid")  # vLLM's template variables: only `thinking` here
    thinking: bool | None = None


Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TokenCount = Annotated[int, Field(ge=1, le=1 << 20)]


class ChatCompletionRequest(Schema):
    model: str
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(ge=-INT64, le=INT64 - 1)] | None = None
    stop: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                          Field(max_length=MAX_STOP)] | None = None  # fmt: skip
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None


def json_shape(value, limit: int) -> tuple[int, int]:
    """(depth, number of values) of parsed JSON, without recursion; stops counting depth past `limit`."""
    depth, values, stack = 0, 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        values += 1
        depth = max(depth, d)
        if d > limit:
            return depth, values
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return depth, values


_TYPES = {"str", "int", "float", "bool", "list", "dict"}


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.islower() and part not in _TYPES and not any(c in part for c in "[(-"):  # not a union member
            out += f".{part}" if out else part
    return out


def parse_body(raw: bytes) -> ChatCompletionRequest:
    """Bytes -> validated request; every failure is an ApiError(400)."""
    try:
        body = pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError as e:
        reason = "it nests too deeply" if "recursion limit" in str(e) else str(e)
        raise ApiError(400, f"the request body is not valid JSON: {reason}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if json_shape(body, MAX_JSON_DEPTH)[0] > MAX_JSON_DEPTH:
        raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        err = max(e.errors(include_url=False, include_input=False), key=lambda x: len(x["loc"]))  # the most specific
        path = _path(err["loc"])
        param = err["loc"][0] if err["loc"] and isinstance(err["loc"][0], str) else None
        msg = err["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"'{path}': {msg}" if path else msg, param) from None


def openapi_components() -> dict:
    """The request's JSON Schemas, for /openapi.json's components.schemas."""
    schema = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {**defs, "ChatCompletionRequest": schema}


REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}}  # fmt: skip


def generation_args(req: ChatCompletionRequest, model_name: str) -> dict:
    """The engine's arguments for a validated request, or an ApiError for what this server cannot honour
    (README's `hybrid serve` table). max_tokens None means: up to the rest of the context."""
    if req.model != model_name:
        raise ApiError(404, f"the model '{req.model}' does not exist; this server has '{model_name}'", "model",
                       "model_not_found", "not_found_error")  # fmt: skip
    refuse = [("n", (req.n or 1) > 1, "'n' > 1 is not supported: one choice per request"),
              ("response_format", req.response_format is not None and req.response_format.type != "text",
               "only response_format {'type': 'text'} is supported (no structured output yet)"),
              ("presence_penalty", bool(req.presence_penalty), "'presence_penalty' other than 0 is not supported"),
              ("frequency_penalty", bool(req.frequency_penalty), "'frequency_penalty' other than 0 is not supported"),
              ("logit_bias", bool(req.logit_bias), "'logit_bias' is not supported"),
              ("stream_options", req.stream_options is not None and not req.stream,
               "'stream_options' is only allowed when 'stream' is true"),
              ("top_logprobs", req.top_logprobs is not None and not req.logprobs,
               "'top_logprobs' needs 'logprobs': true")]  # fmt: skip
    for param, bad, message in refuse:
        if bad:
            raise ApiError(400, message, param, "unsupported_parameter" if "support" in message else None)
    tools = [t.model_dump(exclude_none=True) for t in req.tools or ()] if req.tool_choice != "none" else []
    if isinstance(req.tool_choice, NamedToolChoice) and req.tool_choice.function.name not in {
        t["function"]["name"] for t in tools
    }:
        raise ApiError(400, f"tool_choice names '{req.tool_choice.function.name}', which is not in 'tools'",
                       "tool_choice")  # fmt: skip
    messages = []
    for m in req.messages:  # OpenAI's newer "developer" role is K2's system role
        d = m.model_dump(exclude_none=True)
        messages.append({**d, "role": "system"} if m.role == "developer" else d)
    return {
        "messages": messages,
        "tools": tools or None,
        "max_tokens": req.max_completion_tokens or req.max_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "seed": req.seed,
        "stop": [req.stop] if isinstance(req.stop, str) else req.stop or [],
        "stream": bool(req.stream),
        "include_usage": bool(req.stream_options and req.stream_options.include_usage),
        "thinking": req.chat_template_kwargs.thinking if req.chat_template_kwargs else None,
        "top_logprobs": (req.top_logprobs or 0) if req.logprobs else None,  # None: no logprobs
    }
