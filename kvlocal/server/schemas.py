"""The OpenAI chat-completions wire format, as pydantic models (requests checked, responses built).

Only what kvlocal serves is modelled; fields an OpenAI client may send that kvlocal has no use
for (``user``, ``stream_options``, ...) are accepted and ignored, while fields whose meaning
kvlocal cannot honour (``n`` > 1, tools, non-text content) are refused with a 400.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def as_turn(self) -> dict:
        """The turn for the chat template (``developer`` is the newer name of ``system``)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the usage
    n: int = Field(default=1, ge=1, le=1)
    tools: list | None = Field(default=None, max_length=0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("messages")
    @classmethod
    def _last_turn(cls, v):
        if v[-1].role == "assistant":
            raise ValueError("the last message must not be the assistant's: there is nothing to answer")
        if any(not m.text().strip() for m in v):
            raise ValueError("every message needs content")
        return v

    def limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvlocal"
    document: str
    cells: int
    tokens: int
    ratio: float
    method: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    """The OpenAI API's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
