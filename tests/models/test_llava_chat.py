"""LLaVA-1.5's template and label masks, checked token by token with a word tokenizer."""
import pytest
import torch

from vlfast.models.llava_chat import IGNORE_INDEX, SYSTEM, conversation_text, encode_conversation, pack, pad_batch

IMAGE_ID, EOS, BOS = 900, 2, 1


class Words:
    """A word tokenizer that keeps its vocabulary growing: each new word gets the next id from 10."""

    def __init__(self):
        self.ids = {}

    def __call__(self, text):
        return [self.ids.setdefault(w, 10 + len(self.ids)) for w in text.split()]


def _decode(tok, ids):
    names = {i: w for w, i in tok.ids.items()} | {IMAGE_ID: "<img>", EOS: "</s>", BOS: "<s>"}
    return [names[int(i)] for i in ids]


def test_two_turns_with_an_image_learn_only_the_answers():
    tok = Words()
    turns = [("<image>\nwhat colour is the circle ?", "red"), ("where is it ?", "top left")]
    ids, labels = encode_conversation(turns, tok, image_token_index=IMAGE_ID, tokens_per_image=3,
                                      eos_token_id=EOS, bos_token_id=BOS)
    words = _decode(tok, ids)
    system = SYSTEM.split()
    want = (["<s>"] + system + ["USER:", "<img>", "<img>", "<img>", "what", "colour", "is", "the", "circle", "?",
                                "ASSISTANT:", "red", "</s>", "USER:", "where", "is", "it", "?", "ASSISTANT:", "top",
                                "left", "</s>"])
    assert words == want
    learned = [w for w, lab in zip(words, labels.tolist()) if lab != IGNORE_INDEX]
    assert learned == ["red", "</s>", "top", "left", "</s>"]
    assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    assert (labels[ids == IMAGE_ID] == IGNORE_INDEX).all()
    assert conversation_text(turns).endswith("USER: where is it ? ASSISTANT: top left</s>")


def test_stage_one_captions_are_one_turn():
    tok = Words()
    ids, labels = encode_conversation([("<image>", "a red circle")], tok, image_token_index=IMAGE_ID,
                                      tokens_per_image=2, eos_token_id=EOS)
    learned = [w for w, lab in zip(_decode(tok, ids), labels.tolist()) if lab != IGNORE_INDEX]
    assert learned == ["a", "red", "circle", "</s>"]
    assert int((ids == IMAGE_ID).sum()) == 2


def test_batching_pads_and_packing_concatenates():
    tok = Words()
    a = encode_conversation([("<image>", "a red circle")], tok, image_token_index=IMAGE_ID, tokens_per_image=2,
                            eos_token_id=EOS)
    b = encode_conversation([("<image>\nwhat ?", "blue")], tok, image_token_index=IMAGE_ID, tokens_per_image=2,
                            eos_token_id=EOS)
    batch = pad_batch([a, b])
    longest = max(len(a[0]), len(b[0]))
    assert batch["input_ids"].shape == (2, longest)
    assert batch["attention_mask"].sum().item() == len(a[0]) + len(b[0])
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    packed = pack([a, b])
    assert packed["cu_seqlens"].tolist() == [0, len(a[0]), len(a[0]) + len(b[0])]
    assert torch.equal(packed["input_ids"], torch.cat([a[0], b[0]])) and packed["max_seqlen"] == longest


def test_bad_conversations_are_named():
    with pytest.raises(ValueError, match="at least one"):
        encode_conversation([], Words(), image_token_index=IMAGE_ID, tokens_per_image=2, eos_token_id=EOS)
    with pytest.raises(TypeError, match="turn 0: question and answer must be strings"):
        encode_conversation([("q", 3)], Words(), image_token_index=IMAGE_ID, tokens_per_image=2, eos_token_id=EOS)
