"""A version's pinned system prompt, applied to the chat requests routed to it. Pure: no I/O.

The LoraAddon's `systemPromptPolicy` says what happens when the client brings its own system message
(a message with role `system` or `developer`):

- `prepend` (default): the version's prompt comes first. When the client's first message is a system message
  with text content, the two are joined into that one message (prompt, a blank line, the client's text),
  because many chat templates accept only one leading system message; otherwise the version's prompt is a
  new first message;
- `replace`: the client's system messages are dropped and the version's prompt is the first message;
- `keepUser`: the client's system messages are kept as they are; the version's prompt is used only when
  the client sent none.

Completions (`/v1/completions`, a raw prompt) are left alone: there is no system message to set.
"""

from __future__ import annotations

from typing import Any

SYSTEM_ROLES = frozenset({"system", "developer"})
POLICIES = ("prepend", "replace", "keepUser")


def _is_system(message: Any) -> bool:
    return isinstance(message, dict) and message.get("role") in SYSTEM_ROLES


def apply_system_prompt(body: dict[str, Any], prompt: str | None, policy: str) -> None:
    """Rewrite `body["messages"]` in place for the version's `prompt` under `policy` (see the module doc)."""
    messages = body.get("messages")
    if not prompt or not isinstance(messages, list):
        return  # no prompt pinned, or a malformed body the model server will refuse with its own error
    pinned = {"role": "system", "content": prompt}
    if policy == "replace":
        body["messages"] = [pinned, *(m for m in messages if not _is_system(m))]
    elif policy == "keepUser":
        if not any(_is_system(m) for m in messages):
            body["messages"] = [pinned, *messages]
    elif messages and _is_system(messages[0]) and isinstance(messages[0].get("content"), str):
        first = {**messages[0], "role": "system", "content": f"{prompt}\n\n{messages[0]['content']}"}
        body["messages"] = [first, *messages[1:]]
    else:
        body["messages"] = [pinned, *messages]
