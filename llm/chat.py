"""The prompt format, in one place: training, the judge stage and the server all use these functions.

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": str}.
Each message becomes its role token, its text and an end token, using special tokens the
tokenizer reserved for this (so no text a user types can forge a role):

    <|system|>You are helpful.<|end|><|user|>Name a colour.<|end|><|assistant|>Blue.<|end|>

A prompt for generation stops after `<|assistant|>`; the model writes the answer and `<|end|>`,
which is the stop token. An Alpaca record {instruction, input, output} is one user turn
(instruction, a blank line, then input if any) and one assistant turn.
"""

from __future__ import annotations

import json
from typing import Iterable

from llm.tokenizer import ASSISTANT, END, SYSTEM, USER, Tokenizer

ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# The same format as a Jinja chat template, for tools that render prompts as text themselves
# (transformers' apply_chat_template, llama.cpp's server): its text is what encode_conversation's
# ids decode to. No whitespace between the tags, so no trim/lstrip setting can change the text.
CHAT_TEMPLATE = (
    "{%- set roles = " + json.dumps(ROLE_TOKENS) + " -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in roles -%}"
    "{{ raise_exception('role must be one of " + ", ".join(ROLE_TOKENS) + "') }}"
    "{%- endif -%}"
    "{{ roles[message['role']] + message['content'] + '" + END + "' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + ASSISTANT + "' }}{%- endif -%}"
)


def alpaca_messages(instruction: str, input: str = "", output: str | None = None) -> list[dict]:
    """Messages for an Alpaca-style record; the assistant turn only when there is an output."""
    user = instruction if not input else f"{instruction}\n\n{input}"
    messages = [{"role": "user", "content": user}]
    if output is not None:
        messages.append({"role": "assistant", "content": output})
    return messages


def validate(messages: Iterable[dict]) -> list[dict]:
    """Messages as a list, or ValueError naming what is wrong (for clear 4xx answers and skips)."""
    messages = list(messages)
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLE_TOKENS:
            raise ValueError(f"message {i}: role must be one of {', '.join(ROLE_TOKENS)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {i}: content must be a string")
    return messages


def encode_conversation(tokenizer: Tokenizer, messages: Iterable[dict], *,
                        add_generation_prompt: bool = True) -> tuple[list[int], list[bool]]:
    """(token ids, loss mask): the mask is True on assistant text and its end token only.

    With add_generation_prompt, a trailing `<|assistant|>` asks the model for the next answer.
    """
    specials = tokenizer.special_tokens
    ids: list[int] = []
    mask: list[bool] = []
    for message in validate(messages):
        trained = message["role"] == "assistant"
        text_ids = tokenizer.encode(message["content"])  # special-token strings stay plain text
        ids += [specials[ROLE_TOKENS[message["role"]]], *text_ids, specials[END]]
        # The role token is given, not predicted: the model learns the answer and where it ends.
        mask += [False] + [trained] * len(text_ids) + [trained]
    if add_generation_prompt:
        ids.append(specials[ASSISTANT])
        mask.append(False)
    return ids, mask


def encode_prompt(tokenizer: Tokenizer, messages: Iterable[dict]) -> list[int]:
    """Token ids of a prompt that asks the model for the assistant's next answer."""
    return encode_conversation(tokenizer, messages, add_generation_prompt=True)[0]


def encode_example(tokenizer: Tokenizer, instruction: str, input: str, output: str) -> tuple[list[int], list[bool]]:
    """A training example: the whole conversation, with the loss mask on the response only."""
    return encode_conversation(tokenizer, alpaca_messages(instruction, input, output), add_generation_prompt=False)


def stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Generation ends at the end of the assistant's turn (or a document boundary)."""
    return [tokenizer.special_tokens[END], tokenizer.special_tokens["<|endoftext|>"]]
