"""A small, real byte-level BPE tokenizer for the tiny demo/test checkpoint.

Trained deterministically with the `tokenizers` library on an embedded English corpus; same pre-tokenisation
family as Qwen2 (byte-level, so every UTF-8 string round-trips), the qwen2 special tokens, and the media /
region placeholders as single added tokens — so prompts, placeholder counting and streaming detokenisation
run through exactly the code paths a real checkpoint uses.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MEDIA_TOKENS = ["<image>", "<vila/video>", "<vila/sentinel>", "<region>"]

QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """
The chair is to the left of the table, and the lamp stands behind the sofa in the living room.
How far is the red box from the blue cup? It is about 1.5 meters away, measured from center to center.
Region [0] is closer to the camera than Region [1]. Which object is taller, the door or the window?
The kitchen has a sink, a stove, a white refrigerator and three wooden cabinets above the counter.
Answer with the option's letter from the given choices directly. Please answer the question using a
single word or phrase. The distance between the two objects is 2.3 meters; the height is 0.8 meters.
You are a helpful assistant. Describe the scene: a bed, two pillows, a desk with a monitor and a keyboard.
Counting objects: there are 4 chairs, 2 tables, 1 television and 7 books on the shelf near the wall.
The room is approximately 5 meters long and 4 meters wide, so its area is about 20 square meters.
Yes. No. Left. Right. Above. Below. In front of. Behind. Near. Far. Larger. Smaller. Same size.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 15 20 25 30 50 100 0.5 1.25 3.14 — units: cm, m, meters, centimeters.
Café, naïve, über, 東京, 3D, point map, depth, camera, frame, video, image, region, mask, spatial reasoning.
"""


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.strip().splitlines() if line]
    tok.train_from_iterator(lines * 4, trainer=trainer)  # repetition only sharpens counts; order is fixed
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|endoftext|>", *MEDIA_TOKENS]})
    fast.chat_template = QWEN2_CHAT_TEMPLATE
    return fast
