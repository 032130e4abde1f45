"""A version's pinned system prompt on the chat requests routed to it, under each systemPromptPolicy."""

from __future__ import annotations

from typing import Any

import pytest

from loraserve.router.prompts import apply_system_prompt

USER = {"role": "user", "content": "hi"}
THEIRS = {"role": "system", "content": "Be brief."}


def run(messages: list[Any], policy: str, prompt: str | None = "You are Acme's bot.") -> list[Any]:
    body: dict[str, Any] = {"model": "m", "messages": messages}
    apply_system_prompt(body, prompt, policy)
    return list(body["messages"])


@pytest.mark.parametrize("policy", ["prepend", "replace", "keepUser"])
def test_without_a_client_system_message_every_policy_adds_the_prompt(policy: str) -> None:
    assert run([USER], policy) == [{"role": "system", "content": "You are Acme's bot."}, USER]


def test_policies_when_the_client_brings_a_system_message() -> None:
    assert run([THEIRS, USER], "prepend") == [{"role": "system", "content": "You are Acme's bot.\n\nBe brief."}, USER]
    assert run([THEIRS, USER], "replace") == [{"role": "system", "content": "You are Acme's bot."}, USER]
    assert run([THEIRS, USER], "keepUser") == [THEIRS, USER]
    developer = {"role": "developer", "content": "Use French."}
    assert run([USER, developer], "replace") == [{"role": "system", "content": "You are Acme's bot."}, USER]
    # a system message that is not first, or not plain text, is not merged: the prompt goes first on its own
    parts = {"role": "system", "content": [{"type": "text", "text": "x"}]}
    assert run([parts, USER], "prepend") == [{"role": "system", "content": "You are Acme's bot."}, parts, USER]


def test_no_prompt_or_no_messages_leaves_the_body_alone() -> None:
    assert run([THEIRS, USER], "replace", prompt=None) == [THEIRS, USER]
    body: dict[str, Any] = {"model": "m", "prompt": "raw"}
    apply_system_prompt(body, "x", "prepend")
    assert body == {"model": "m", "prompt": "raw"}
