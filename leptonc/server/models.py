"""The OpenAI request bodies the server accepts (pydantic), and their translation to engine parameters.

Fields of OpenAI's API that would change the output and that the engine cannot honour (n > 1, best_of > 1,
logprobs, echo, suffix, tools, functions, penalties, logit_bias, a response_format other than text, content parts
other than text) are refused with a 400 naming them, never silently ignored. Other unknown fields are ignored,
for forward compatibility. leptonc's extensions: `top_k` and `ignore_eos`.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from leptonc.runtime.batching import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = Field(None, description="Tokens to generate (default 16; chat: up to the limit)")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    ignore_eos: bool = False
    logprobs: Optional[Union[int, bool]] = None
    user: Optional[str] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None
    response_format: Optional[dict] = None

    def unsupported(self) -> str | None:
        if self.n != 1:
            return "n: only n=1 is supported"
        if self.logprobs:
            return "logprobs: not supported"
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                return f"{name}: not supported (only 0)"
        if self.logit_bias:
            return "logit_bias: not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return f"response_format: only type text is supported, not {self.response_format.get('type')!r}"
        return None

    def sampling(self, max_tokens: int) -> SamplingParams:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed, stop=tuple(s for s in stops if s),
                              stop_at_eos=not self.ignore_eos)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int]]
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo: not supported"
        if self.best_of not in (None, 1):
            return "best_of: only best_of=1 is supported"
        if self.suffix:
            return "suffix: not supported"
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            return "prompt: one prompt per request (a list of strings must hold exactly one)"
        return super().unsupported()


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    tools: Optional[list] = None
    functions: Optional[list] = None
    top_logprobs: Optional[int] = None

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools: not supported"
        if self.functions:
            return "functions: not supported"
        if self.top_logprobs:
            return "top_logprobs: not supported"
        for i, message in enumerate(self.messages):
            for part in message.content if isinstance(message.content, list) else ():
                if part.get("type") != "text":
                    return f"messages.{i}.content: only text parts are supported, not {part.get('type')!r}"
        return super().unsupported()
