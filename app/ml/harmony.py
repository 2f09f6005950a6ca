"""The harmony chat format: render prompts and training sequences, parse completions.

Rendering goes through `openai-harmony` (the official renderer), so prompts are token-for-token what
gpt-oss was trained on. Two project choices:

- No conversation start date in the system message: harmony omits it when unset, so a prompt (and a
  training row) renders the same tokens every day. The chat template TRL ships writes today's date.
- Only the last assistant turn keeps its reasoning (``thinking``). At inference harmony drops the
  analysis of earlier turns, so training on it would teach the model a context it never sees.

Parsing is our own small state machine over token ids rather than harmony's parser, because
generated tokens may be cut off mid-message, skip the final channel or contain stray specials, and a
parse error must never cost the caller the text that was generated.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, get_args

import openai_harmony as oh

from app.ml.tokenizer import ensure_harmony_assets, token_bytes

ReasoningEffort = Literal["low", "medium", "high"]
REASONING_EFFORTS: tuple[str, ...] = get_args(ReasoningEffort)

RETURN, CONSTRAIN, CHANNEL, START, END, MESSAGE, CALL = 200002, 200003, 200005, 200006, 200007, 200008, 200012
STOP_TOKEN_IDS: tuple[int, ...] = (RETURN, CALL)
_EFFORT = {
    "low": oh.ReasoningEffort.LOW,
    "medium": oh.ReasoningEffort.MEDIUM,
    "high": oh.ReasoningEffort.HIGH,
}
_ROLES = {"user": oh.Role.USER, "assistant": oh.Role.ASSISTANT}


@lru_cache(maxsize=1)
def encoding() -> oh.HarmonyEncoding:
    """The harmony encoding. It reads o200k_base.tiktoken from TIKTOKEN_ENCODINGS_BASE; where no
    caller has run ``ensure_harmony_assets`` yet, build the assets in the configured models dir."""
    if not os.environ.get("TIKTOKEN_ENCODINGS_BASE"):
        from app.config import get_settings

        ensure_harmony_assets(get_settings().models_path)
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def _check_effort(reasoning_effort: str) -> oh.ReasoningEffort:
    if reasoning_effort not in _EFFORT:
        raise ValueError(
            f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}; got {reasoning_effort!r}"
        )
    return _EFFORT[reasoning_effort]


def _header(developer: str | None, reasoning_effort: str) -> list[oh.Message]:
    system = oh.SystemContent.new().with_reasoning_effort(_check_effort(reasoning_effort))
    header = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
    if developer:
        dev = oh.DeveloperContent.new().with_instructions(developer)
        header.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev))
    return header


def _split_instructions(messages: Sequence[dict[str, Any]], developer: str | None) -> tuple[str | None, list]:
    """System/developer turns inside ``messages`` become the developer instructions, the way the
    gpt-oss chat template treats a leading system message."""
    parts = [developer] if developer else []
    turns = []
    for msg in messages:
        if msg.get("role") in ("system", "developer"):
            parts.append(str(msg.get("content") or ""))
        else:
            turns.append(msg)
    text = "\n\n".join(p for p in parts if p)
    return (text or None), turns


def _assistant_messages(msg: dict[str, Any], keep_thinking: bool) -> list[oh.Message]:
    out = []
    thinking = msg.get("thinking")
    if keep_thinking and thinking:
        out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, thinking).with_channel("analysis"))
    out.append(
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, msg.get("content") or "").with_channel("final")
    )
    return out


def _turn_messages(turns: Sequence[dict[str, Any]]) -> list[tuple[oh.Message, bool]]:
    """Harmony messages for the turns, each with `is_assistant`; only the last assistant turn keeps
    its thinking."""
    last_assistant = max((i for i, t in enumerate(turns) if t.get("role") == "assistant"), default=-1)
    out: list[tuple[oh.Message, bool]] = []
    for i, turn in enumerate(turns):
        role = turn.get("role")
        if role not in _ROLES:
            raise ValueError(
                f"messages[{i}].role must be one of user, assistant, system, developer; got {role!r}"
            )
        if role == "assistant":
            out += [(m, True) for m in _assistant_messages(turn, keep_thinking=i == last_assistant)]
        else:
            out.append(
                (oh.Message.from_role_and_content(oh.Role.USER, str(turn.get("content") or "")), False)
            )
    return out


def render_prompt(
    messages: Sequence[dict[str, Any]], *, developer: str | None = None, reasoning_effort: str = "medium"
) -> list[int]:
    """Token ids of the conversation, ending in ``<|start|>assistant`` for the model to continue."""
    developer, turns = _split_instructions(messages, developer)
    msgs = _header(developer, reasoning_effort) + [m for m, _ in _turn_messages(turns)]
    conv = oh.Conversation.from_messages(msgs)
    return list(encoding().render_conversation_for_completion(conv, oh.Role.ASSISTANT))


def render_training(
    messages: Sequence[dict[str, Any]],
    *,
    developer: str | None = None,
    reasoning_effort: str = "medium",
    train_on_reasoning: bool = True,
) -> tuple[list[int], list[int]]:
    """Input ids and a 0/1 completion mask (1 = loss on that token) for one conversation.

    The mask covers what the model itself generates after a prompt ending in ``<|start|>assistant``:
    assistant channels, their bodies and end tokens, and the ``<|start|>assistant`` between two
    assistant messages. With ``train_on_reasoning=False`` the analysis message is context only.
    The last message ends in ``<|return|>`` as harmony renders training data.
    """
    developer, turns = _split_instructions(messages, developer)
    enc = encoding()
    ids: list[int] = []
    mask: list[int] = []
    for msg in _header(developer, reasoning_effort):
        ids += enc.render(msg)
    mask += [0] * len(ids)
    prev_assistant = False
    for msg, is_assistant in _turn_messages(turns):
        toks = list(enc.render(msg))
        trained = is_assistant and (train_on_reasoning or msg.channel != "analysis")
        lead = 2 if is_assistant and not prev_assistant else 0  # `<|start|>assistant` is in the prompt
        mask += [0] * lead + [int(trained)] * (len(toks) - lead)
        ids += toks
        prev_assistant = is_assistant
    if ids and ids[-1] == END and prev_assistant:
        ids[-1] = RETURN
    return ids, mask


# --- parsing ---------------------------------------------------------------------------------------


@dataclass
class ParsedCompletion:
    reasoning: str
    content: str
    finish_reason: str  # "stop" (ended by <|return|> / <|call|>) or "length" (cut off)


def _decode_bytes(token_ids: Sequence[int]) -> bytes:
    return b"".join(token_bytes(t) for t in token_ids if not is_special(t))


def is_special(token_id: int) -> bool:
    return token_id >= 199_998


@dataclass
class StreamDecoder:
    """Feed generated token ids one at a time; get ``(channel, text_delta)`` pieces.

    ``channel`` is "analysis", "final" (or another channel name the model wrote). Text outside any
    ``<|message|>`` body (headers, roles, or text a model wrote without harmony structure) is never
    emitted. A message without a channel header is treated as "final". UTF-8 sequences split across
    tokens are held back until complete.
    """

    # The prompt ends in `<|start|>assistant`, so a completion starts inside a message header.
    state: str = "header"  # "header" after <|start|> / <|channel|>, "body" after <|message|>, "done"
    channel: str = "final"
    header: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    _utf8: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    def feed(self, token_id: int) -> tuple[str, str] | None:
        if self.state == "done":
            return None
        if is_special(token_id):
            return self._special(token_id)
        if self.state == "header":
            self.header.append(token_id)
            return None
        text = self._utf8.decode(token_bytes(token_id))
        return (self.channel, text) if text else None

    def _special(self, token_id: int) -> tuple[str, str] | None:
        flushed = self._flush()
        if token_id in STOP_TOKEN_IDS:
            self.state, self.finish_reason = "done", "stop"
        elif token_id in (START, CHANNEL):
            if token_id == START:
                self.header = []
            self.state = "header"
            self.header.append(token_id)
        elif token_id == MESSAGE and self.state == "header":
            self.channel = _channel_from_header(self.header)
            self.state = "body"
        elif token_id == END:
            self.state, self.channel, self.header = "header", "final", []
        # other specials (<|endoftext|>, reserved, <|constrain|> in a body) are dropped
        return flushed

    def _flush(self) -> tuple[str, str] | None:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return (self.channel, text) if text and self.state == "body" else None

    def finish(self) -> tuple[str, str] | None:
        """Flush bytes still held back (call once the generation has ended)."""
        return self._flush()


def _channel_from_header(header: Sequence[int]) -> str:
    """`<|start|>assistant<|channel|>final <|constrain|>json` -> "final"; no channel -> "final"."""
    if CHANNEL not in header:
        return "final"
    after = list(header[header.index(CHANNEL) + 1 :])
    plain = [t for t in after[: after.index(CONSTRAIN)] if not is_special(t)] if CONSTRAIN in after else after
    name = _decode_bytes(plain).decode("utf-8", "replace").strip().split(" ")[0]
    return name or "final"


def parse_completion(token_ids: Sequence[int]) -> ParsedCompletion:
    """Split generated ids (what followed ``<|start|>assistant``) into reasoning and content.
    The analysis channel is reasoning; every other channel's text is content."""
    decoder = StreamDecoder()
    reasoning: list[str] = []
    content: list[str] = []
    for piece in [*(decoder.feed(t) for t in token_ids), decoder.finish()]:
        if piece is not None:
            (reasoning if piece[0] == "analysis" else content).append(piece[1])
    return ParsedCompletion("".join(reasoning), "".join(content), decoder.finish_reason)
