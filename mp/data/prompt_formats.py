"""Prompt formats: how a conversation becomes the token ids and loss mask of an SFT sample
(Megatron's ``--sft-tokenizer-prompt-format``).

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content":
str}``. A format writes ``begin``, then each message as ``header + content + footer`` of its
role; the conversation then ends with the end-of-document id (`mp.data.sft_dataset`). The
model learns to write the assistant's messages: an assistant message's content and footer,
and the end-of-document id after a conversation whose last message is the assistant's, are
trained; everything else (``begin``, headers, the system's and user's messages) is context.

Each piece is tokenized on its own (`Tokenizer.tokenize_piece`, no BOS added), so the loss
mask follows the pieces exactly; a BPE merge across a piece boundary is therefore never made
(and a SentencePiece model marks each piece as the start of a word, as it marks a text's).
Special-token text in a format (``<|im_start|>``) becomes that token's id with a Hugging Face
tokenizer that has it as a special token, and plain text with the others.

Formats (``PROMPT_FORMATS``):

- ``nemotron-h-aligned`` (Megatron's default): ``<SPECIAL_10>System\\n{system}\\n``,
  ``<SPECIAL_11>User\\n{user}\\n<SPECIAL_11>Assistant\\n``, ``{assistant}\\n``, each content
  stripped of surrounding white space, as Megatron's template does.
- ``chatml``: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` (Qwen, and many others).
- ``llama3``: ``<|begin_of_text|>`` then
  ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mp.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PromptFormat:
    """``headers[role] + content + footers[role]`` per message, after ``begin``; ``strip``
    strips each content of surrounding white space first (module doc)."""

    headers: dict[str, str]
    footers: dict[str, str]
    begin: str = ""
    strip: bool = False

    def pieces(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """``(text, trained)`` pieces of one conversation, in order, empty ones left out."""
        pieces = [(self.begin, False)]
        for message in messages:
            role, content = message["role"], message["content"]
            trained = role == "assistant"
            pieces += [(self.headers[role], False),
                       (content.strip() if self.strip else content, trained),
                       (self.footers[role], trained)]
        return [(text, trained) for text, trained in pieces if text]

    def encode(self, messages: list[dict], tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
        """The ids of one conversation, ended by ``tokenizer.eod``, and whether each is
        trained (the eod is when the assistant spoke last)."""
        ids, trained = self._tokenized(self.pieces(messages), tokenizer)
        return ids + [tokenizer.eod], trained + [messages[-1]["role"] == "assistant"]

    def prompt(self, messages: list[dict], tokenizer: Tokenizer) -> list[int]:
        """The ids a model continues to answer as the assistant: ``messages`` (a conversation
        so far) and the assistant's header."""
        pieces = [*self.pieces(messages), (self.headers["assistant"], False)]
        return self._tokenized([p for p in pieces if p[0]], tokenizer)[0]

    @staticmethod
    def _tokenized(pieces: list[tuple[str, bool]], tokenizer: Tokenizer
                   ) -> tuple[list[int], list[bool]]:
        ids, trained = [], []
        for text, train in pieces:
            piece = tokenizer.tokenize_piece(text)
            ids += piece
            trained += [train] * len(piece)
        return ids, trained


def _per_role(template: str) -> dict[str, str]:
    return {role: template.format(role=role) for role in ROLES}


PROMPT_FORMATS: dict[str, PromptFormat] = {
    "nemotron-h-aligned": PromptFormat(
        headers={"system": "<SPECIAL_10>System\n", "user": "<SPECIAL_11>User\n",
                 "assistant": ""},
        footers={"system": "\n", "user": "\n<SPECIAL_11>Assistant\n", "assistant": "\n"},
        strip=True),
    "chatml": PromptFormat(headers=_per_role("<|im_start|>{role}\n"),
                           footers=_per_role("<|im_end|>\n")),
    "llama3": PromptFormat(headers=_per_role("<|start_header_id|>{role}<|end_header_id|>\n\n"),
                           footers=_per_role("<|eot_id|>"), begin="<|begin_of_text|>"),
}


def get_prompt_format(name: str) -> PromptFormat:
    """The format ``name`` (ValueError naming the known ones otherwise)."""
    if name not in PROMPT_FORMATS:
        raise ValueError(f"sft_tokenizer_prompt_format={name!r} must be one of "
                         f"{', '.join(map(repr, PROMPT_FORMATS))}")
    return PROMPT_FORMATS[name]
