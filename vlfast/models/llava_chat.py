"""LLaVA-1.5's conversation template, and the labels that put the loss on the assistant's answers only.

    "{system} USER: <image>\\n{question 1} ASSISTANT: {answer 1}</s>USER: {question 2} ASSISTANT: {answer 2}</s>"

(Vicuna v1's separators: " " after the system message and each question, "</s>" after each answer.)
encode_conversation tokenises the pieces one by one with the caller's tokenizer, expands "<image>" to
tokens_per_image copies of image_token_index, and labels -100 everything but the answers and the end of
sequence token that closes each of them: the system message, the user turns, the role names and the
image tokens carry no loss. Stage-1 (caption) data is one turn: "<image>" as the question, the caption
as the answer.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")
IMAGE = "<image>"
IGNORE_INDEX = -100


def conversation_text(turns: Sequence[tuple[str, str]], system: str = SYSTEM) -> str:
    """The template as one string (for reading; training data goes through encode_conversation)."""
    parts = [system + " "]
    for question, answer in turns:
        parts.append(f"USER: {question} ASSISTANT: {answer}</s>")
    return "".join(parts)


def encode_conversation(turns: Sequence[tuple[str, str]], tokenize: Callable[[str], list], *, image_token_index: int,
                        tokens_per_image: int, eos_token_id: int, bos_token_id: int = None,
                        system: str = SYSTEM) -> tuple[Tensor, Tensor]:
    """(input_ids (S,), labels (S,)) int64 for turns [(question, answer), ...]: "<image>" in a question
    becomes tokens_per_image image tokens (the first question normally starts with "<image>\\n");
    labels equal input_ids on the answers and each answer's closing eos_token_id, -100 elsewhere.

    tokenize(text) -> token ids without special tokens (for a transformers tokenizer:
    lambda t: tok(t, add_special_tokens=False).input_ids).
    """
    if not turns:
        raise ValueError("a conversation needs at least one (question, answer) turn")
    ids, labels = [], []

    def add(tokens: list, learn: bool) -> None:
        ids.extend(tokens)
        labels.extend(tokens if learn else [IGNORE_INDEX] * len(tokens))

    if bos_token_id is not None:
        add([bos_token_id], False)
    add(tokenize(system + " "), False)
    for number, (question, answer) in enumerate(turns):
        if not isinstance(question, str) or not isinstance(answer, str):
            raise TypeError(f"turn {number}: question and answer must be strings")
        add(tokenize("USER: "), False)
        pieces = question.split(IMAGE)
        for i, piece in enumerate(pieces):
            if i:
                add([image_token_index] * tokens_per_image, False)
            if piece:
                add(tokenize(piece), False)
        add(tokenize(" ASSISTANT: "), False)
        add(tokenize(answer), True)
        add([eos_token_id], True)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def pad_batch(examples: Sequence[tuple[Tensor, Tensor]], pad_token_id: int = 0) -> dict:
    """Right-padded {"input_ids", "labels", "attention_mask"} (B, longest) from (input_ids, labels) pairs."""
    longest = max(len(ids) for ids, _ in examples)
    batch = {"input_ids": torch.full((len(examples), longest), pad_token_id, dtype=torch.long),
             "labels": torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long),
             "attention_mask": torch.zeros(len(examples), longest, dtype=torch.long)}
    for row, (ids, labels) in enumerate(examples):
        batch["input_ids"][row, :len(ids)] = ids
        batch["labels"][row, :len(ids)] = labels
        batch["attention_mask"][row, :len(ids)] = 1
    return batch


def pack(examples: Sequence[tuple[Tensor, Tensor]]) -> dict:
    """Several conversations in one row: {"input_ids" (T,), "labels" (T,), "cu_seqlens", "max_seqlen"} for
    LLaVA.loss(..., cu_seqlens=..., max_seqlen=...): no padding, no attention across conversations."""
    lengths = [len(ids) for ids, _ in examples]
    return {"input_ids": torch.cat([ids for ids, _ in examples]), "labels": torch.cat([lab for _, lab in examples]),
            "cu_seqlens": torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32),
            "max_seqlen": max(lengths)}
