"""Mini-Omni's 8-stream vocabulary: one embedding table holds the text ids, then 7 audio layers of
4160 ids each (4096 SNAC codes + 64 specials). Stream 7 is text; streams 0..6 are audio layers."""

TEXT_VOCAB = 151936  # Qwen2 tokenizer range
PADDED_TEXT_VOCAB = TEXT_VOCAB + 64  # 152000: text slice of the logits
AUDIO_VOCAB = 4096  # SNAC codebook size
PADDED_AUDIO_VOCAB = AUDIO_VOCAB + 64  # 4160 ids per audio layer
AUDIO_LAYERS = 7
STREAMS = AUDIO_LAYERS + 1
TEXT_STREAM = AUDIO_LAYERS

# text specials (absolute ids)
EOT = TEXT_VOCAB
PAD_T = TEXT_VOCAB + 1
INPUT_T = TEXT_VOCAB + 2
ANSWER_T = TEXT_VOCAB + 3
ASR = TEXT_VOCAB + 4

# audio specials (local ids within a layer)
EOA = AUDIO_VOCAB
PAD_A = AUDIO_VOCAB + 1
INPUT_A = AUDIO_VOCAB + 2
ANSWER_A = AUDIO_VOCAB + 3


def layershift(local_id, layer: int):
    """Local audio id of ``layer`` -> absolute id in the shared table (works on ints and tensors)."""
    return local_id + PADDED_TEXT_VOCAB + layer * PADDED_AUDIO_VOCAB
