"""Harmony rendering (token-for-token equal to openai-harmony) and robust parsing."""

from __future__ import annotations

from pathlib import Path

import openai_harmony as oh
import pytest

from app.ml.harmony import (
    END,
    RETURN,
    STOP_TOKEN_IDS,
    StreamDecoder,
    encoding,
    parse_completion,
    render_prompt,
    render_training,
)

CHAT = [
    {"role": "system", "content": "reasoning language: French"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris.", "thinking": "La capitale de la France est Paris."},
]


@pytest.fixture(autouse=True)
def _assets(models_dir: Path) -> None:
    """openai-harmony reads o200k_base.tiktoken from the offline assets."""


def _official(messages: list[oh.Message], effort: oh.ReasoningEffort) -> oh.Conversation:
    system = oh.SystemContent.new().with_reasoning_effort(effort)
    dev = oh.DeveloperContent.new().with_instructions("reasoning language: French")
    head = [
        oh.Message.from_role_and_content(oh.Role.SYSTEM, system),
        oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev),
    ]
    return oh.Conversation.from_messages(head + messages)


def _user() -> oh.Message:
    return oh.Message.from_role_and_content(oh.Role.USER, "What is the capital of France?")


def test_prompt_equals_official_renderer() -> None:
    official = encoding().render_conversation_for_completion(
        _official([_user()], oh.ReasoningEffort.HIGH), oh.Role.ASSISTANT
    )
    assert render_prompt(CHAT[:2], reasoning_effort="high") == official


def test_training_sequence_equals_official_renderer() -> None:
    analysis = oh.Message.from_role_and_content(oh.Role.ASSISTANT, CHAT[2]["thinking"]).with_channel(
        "analysis"
    )
    final = oh.Message.from_role_and_content(oh.Role.ASSISTANT, "Paris.").with_channel("final")
    conv = _official([_user(), analysis, final], oh.ReasoningEffort.LOW)
    # Keep the analysis: harmony's default drops it before a final message, but we train on it.
    official = encoding().render_conversation_for_training(
        conv, oh.RenderConversationConfig(auto_drop_analysis=False)
    )
    ids, mask = render_training(CHAT, reasoning_effort="low")
    assert ids == official and ids[-1] == RETURN


def test_mask_covers_exactly_what_the_model_generates() -> None:
    prompt = render_prompt(CHAT[:2])
    ids, mask = render_training(CHAT)
    assert ids[: len(prompt)] == prompt
    assert set(mask[: len(prompt)]) == {0} and set(mask[len(prompt) :]) == {1}
    text = encoding().decode_utf8([t for t, m in zip(ids, mask, strict=True) if m])
    assert text.startswith("<|channel|>analysis<|message|>La capitale")
    assert text.endswith("<|start|>assistant<|channel|>final<|message|>Paris.<|return|>")


def test_reasoning_can_be_left_out_of_the_loss() -> None:
    ids, mask = render_training(CHAT, train_on_reasoning=False)
    trained = encoding().decode_utf8([t for t, m in zip(ids, mask, strict=True) if m])
    assert trained == "<|start|>assistant<|channel|>final<|message|>Paris.<|return|>"
    assert "La capitale" in encoding().decode_utf8(ids)  # still in the context


def test_reasoning_effort_changes_what_the_model_sees() -> None:
    prompts = {e: render_prompt(CHAT[:2], reasoning_effort=e) for e in ("low", "medium", "high")}
    assert len({tuple(p) for p in prompts.values()}) == 3
    for effort, ids in prompts.items():
        assert f"Reasoning: {effort}" in encoding().decode_utf8(ids)
    with pytest.raises(ValueError, match="reasoning_effort must be one of low, medium, high"):
        render_prompt(CHAT[:2], reasoning_effort="extreme")


def test_prompt_is_deterministic_without_a_date() -> None:
    text = encoding().decode_utf8(render_prompt(CHAT[:2]))
    assert "Current date" not in text
    assert render_prompt(CHAT[:2]) == render_prompt(CHAT[:2])


def test_earlier_turns_drop_their_reasoning() -> None:
    turns = [CHAT[1], CHAT[2], {"role": "user", "content": "And Japan?"}]
    text = encoding().decode_utf8(render_prompt(turns))
    assert "La capitale" not in text and "Paris." in text


def _completion(ids: list[int]) -> list[int]:
    return ids[len(render_prompt(CHAT[:2])) :]


def test_parse_round_trip() -> None:
    parsed = parse_completion(_completion(render_training(CHAT)[0]))
    assert (parsed.reasoning, parsed.content, parsed.finish_reason) == (
        "La capitale de la France est Paris.",
        "Paris.",
        "stop",
    )


def test_parse_cut_off_generations() -> None:
    full = _completion(render_training(CHAT)[0])
    in_final = parse_completion(full[:-2])  # cut before "." and <|return|>
    assert in_final.content == "Paris" and in_final.finish_reason == "length"
    in_analysis = parse_completion(full[:6])
    assert in_analysis.content == "" and in_analysis.reasoning.startswith("La")
    assert parse_completion([]).content == ""


def test_parse_missing_final_channel_and_stray_specials() -> None:
    enc = encoding()
    ids = enc.encode("<|channel|>analysis<|message|>thinking<|endoftext|> more<|end|>", allowed_special="all")
    parsed = parse_completion(ids)
    assert (parsed.reasoning, parsed.content, parsed.finish_reason) == ("thinking more", "", "length")
    no_channel = enc.encode("<|message|>plain answer<|return|>", allowed_special="all")
    assert parse_completion(no_channel).content == "plain answer"


def test_stream_decoder_matches_parse_and_holds_split_utf8() -> None:
    msgs = [CHAT[1], {"role": "assistant", "content": "東京 🙂", "thinking": "日本の首都"}]
    ids = render_training(msgs)[0][len(render_prompt(msgs[:1])) :]
    decoder = StreamDecoder()
    pieces = [p for p in (decoder.feed(t) for t in ids) if p]
    assert all("\ufffd" not in text for _, text in pieces)
    assert "".join(t for c, t in pieces if c == "final") == parse_completion(ids).content == "東京 🙂"
    assert "".join(t for c, t in pieces if c == "analysis") == "日本の首都"
    assert decoder.finish_reason == "stop" and decoder.feed(END) is None


def test_stop_tokens() -> None:
    assert set(STOP_TOKEN_IDS) == {200002, 200012}
