"""Tiny Mini-Omni checkpoints in the published layout, for tests and smoke runs.

``write_tiny_checkpoint`` writes the same files as gpt-omni/mini-omni (lit_model.pth,
model_config.yaml, tokenizer.json, small.pt) and hubertsiuzdak/snac_24khz (config.json,
pytorch_model.bin) with tiny widths but the real token-id layout (181120-row table, real special
ids). Weights are seeded random: everything generated from them is noise.
"""
from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from snac import SNAC

from ..core.tiny import cached_folder
from .config import GPTConfig
from .gpt import GPT
from .tokens import AUDIO_LAYERS, AUDIO_VOCAB, PADDED_AUDIO_VOCAB, TEXT_VOCAB, layershift

TINY_GPT = GPTConfig(
    n_layer=2, n_head=4, n_query_groups=2, head_size=8, n_embd=32, intermediate_size=64,
    whisper_adapter_dim=32, tie_word_embeddings=True,
)
FULL_GPT = GPTConfig(tie_word_embeddings=True)  # Qwen2-0.5B as in the published yaml
FULL_WHISPER_DIMS = dict(
    n_mels=80, n_audio_ctx=1500, n_audio_state=768, n_audio_head=12, n_audio_layer=12,
    n_vocab=51865, n_text_ctx=448, n_text_state=768, n_text_head=12, n_text_layer=12,
)
FULL_SNAC = dict(  # hubertsiuzdak/snac_24khz config.json
    sampling_rate=24000, encoder_dim=48, encoder_rates=[2, 4, 8, 8], decoder_dim=1024,
    decoder_rates=[8, 8, 4, 2], attn_window_size=None, codebook_size=4096, codebook_dim=8,
    vq_strides=[4, 2, 1], noise=True, depthwise=True,
)
TINY_WHISPER_DIMS = dict(
    n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=2,
    n_vocab=51865, n_text_ctx=448, n_text_state=32, n_text_head=2, n_text_layer=2,
)
TINY_SNAC = dict(
    sampling_rate=24000, encoder_dim=8, encoder_rates=[2, 4, 8, 8], latent_dim=None, decoder_dim=64,
    decoder_rates=[8, 8, 4, 2], attn_window_size=None, codebook_size=4096, codebook_dim=8,
    vq_strides=[4, 2, 1], noise=True, depthwise=True,
)
# The published model_config.yaml also carries keys our loader does not need; keep some so the
# "unknown keys are ignored" path is exercised.
_EXTRA_YAML = dict(name="Qwen2-0.5B", hf_config={"name": "Qwen2-0.5B", "org": "Qwen"}, vocab_size=50254,
                   padding_multiple=512, mlp_class_name="LLaMAMLP", norm_class_name="RMSNorm",
                   parallel_residual=False, asr_adapter="llamamlp", post_adapter=False,
                   post_adapter_layers=6, cat_audio_vocab_size=29120, pos_type="rope", n_expert=0)


# Bump when what write_tiny_checkpoint writes changes: cached tiny folders of other versions are
# then not reused.
TINY_FORMAT = 2


@dataclass(frozen=True)
class TinyFolders:
    checkpoint: Path
    codec: Path


def tiny_checkpoint(seed: int = 0, root: str | os.PathLike | None = None) -> TinyFolders:
    """The tiny folders for ``seed``, written once into a cache directory and reused."""
    return tiny_folders(f"mini-omni-v{TINY_FORMAT}-seed{seed}", write_tiny_checkpoint, seed, root)


def tiny_folders(name: str, write: Callable[..., None], seed: int, root: str | os.PathLike | None) -> TinyFolders:
    """The folders ``write(checkpoint, codec, seed=seed)`` fills, cached under ``name`` (a
    variant's own, with its format version)."""
    target = cached_folder(name, lambda folder: write(folder / "checkpoint", folder / "snac", seed=seed), root)
    return TinyFolders(target / "checkpoint", target / "snac")


def write_tiny_checkpoint(checkpoint: Path, codec: Path, *, seed: int = 0, config: GPTConfig = TINY_GPT,
                          gpt_class: type[GPT] = GPT,
                          more: Callable[[Path, torch.Generator], None] | None = None) -> None:
    """The published files of gpt-omni/mini-omni into ``checkpoint`` and SNAC's into ``codec``. A
    variant (Mini-Omni2) gives its GPT class and ``more(checkpoint, generator)``, which writes its
    own files, drawn after Whisper's."""
    checkpoint.mkdir(parents=True, exist_ok=True)
    codec.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    torch.save(random_gpt_state(config, generator, gpt_class), checkpoint / "lit_model.pth")
    (checkpoint / "model_config.yaml").write_text(yaml.safe_dump(litgpt_yaml(config)))
    _write_whisper(checkpoint / "small.pt", dict(TINY_WHISPER_DIMS, n_audio_state=config.whisper_adapter_dim), generator)
    if more is not None:
        more(checkpoint, generator)
    write_tiny_tokenizer(checkpoint / "tokenizer.json")
    _write_snac(codec, seed)


def random_gpt_state(config: GPTConfig, generator: torch.Generator, gpt_class: type[GPT] = GPT) -> dict[str, torch.Tensor]:
    """Seeded random weights with the published names (litgpt's init: normal(0, 0.02))."""
    with torch.device("meta"):
        names = gpt_class(config).state_dict()
    state = {}
    for name, tensor in names.items():
        if name.endswith(("norm_1.weight", "norm_2.weight", "ln_f.weight")):
            state[name] = 1.0 + 0.1 * torch.randn(tensor.shape, generator=generator)
        else:
            state[name] = 0.02 * torch.randn(tensor.shape, generator=generator)
    # Random weights would often pick the 64 audio specials where codes belong; silence them in
    # the output table so random replies are mostly decodable audio (the skip path has its own test).
    for layer in range(AUDIO_LAYERS):
        start = layershift(AUDIO_VOCAB, layer)
        state["transformer.wte.weight"][start : start + PADDED_AUDIO_VOCAB - AUDIO_VOCAB] = 0.0
        state["lm_head.weight"][start : start + PADDED_AUDIO_VOCAB - AUDIO_VOCAB] = 0.0
    if config.tie_word_embeddings:  # the published file stores both copies
        state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    return state


def litgpt_yaml(config: GPTConfig) -> dict:
    """``config`` as the published model_config.yaml spells it (what litgpt's Config takes)."""
    return {**_EXTRA_YAML, **config.to_yaml_dict()}


def _sinusoids(length: int, channels: int) -> torch.Tensor:
    increment = math.log(10000) / (channels // 2 - 1)
    inv = torch.exp(-increment * torch.arange(channels // 2))
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def _whisper_shapes(d: dict) -> dict[str, tuple[int, ...]]:
    """openai-whisper's state-dict names and shapes for dims ``d``."""
    shapes: dict[str, tuple[int, ...]] = {}

    def attention(prefix: str, n: int) -> None:
        for part in ("query", "key", "value", "out"):
            shapes[f"{prefix}.{part}.weight"] = (n, n)
            if part != "key":
                shapes[f"{prefix}.{part}.bias"] = (n,)

    def block(prefix: str, n: int, cross: bool) -> None:
        attention(f"{prefix}.attn", n)
        shapes.update({f"{prefix}.attn_ln.weight": (n,), f"{prefix}.attn_ln.bias": (n,)})
        if cross:
            attention(f"{prefix}.cross_attn", n)
            shapes.update({f"{prefix}.cross_attn_ln.weight": (n,), f"{prefix}.cross_attn_ln.bias": (n,)})
        shapes.update({f"{prefix}.mlp.0.weight": (4 * n, n), f"{prefix}.mlp.0.bias": (4 * n,),
                       f"{prefix}.mlp.2.weight": (n, 4 * n), f"{prefix}.mlp.2.bias": (n,),
                       f"{prefix}.mlp_ln.weight": (n,), f"{prefix}.mlp_ln.bias": (n,)})

    a, t = d["n_audio_state"], d["n_text_state"]
    shapes.update({"encoder.positional_embedding": (d["n_audio_ctx"], a),
                   "encoder.conv1.weight": (a, d["n_mels"], 3), "encoder.conv1.bias": (a,),
                   "encoder.conv2.weight": (a, a, 3), "encoder.conv2.bias": (a,)})
    for i in range(d["n_audio_layer"]):
        block(f"encoder.blocks.{i}", a, cross=False)
    shapes.update({"encoder.ln_post.weight": (a,), "encoder.ln_post.bias": (a,),
                   "decoder.positional_embedding": (d["n_text_ctx"], t),
                   "decoder.token_embedding.weight": (d["n_vocab"], t)})
    for i in range(d["n_text_layer"]):
        block(f"decoder.blocks.{i}", t, cross=True)
    shapes.update({"decoder.ln.weight": (t,), "decoder.ln.bias": (t,)})
    return shapes


def random_whisper_state(dims: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """openai-whisper's full state dict (encoder and decoder) with seeded random float16 weights."""
    state = {}
    for name, shape in _whisper_shapes(dims).items():
        if name == "encoder.positional_embedding":
            value = _sinusoids(*shape)
        elif "ln" in name.split(".")[-2]:
            value = (1.0 if name.endswith("weight") else 0.0) + 0.05 * torch.randn(shape, generator=generator)
        else:
            fan_in = shape[1] * (shape[2] if len(shape) == 3 else 1) if len(shape) > 1 else 1
            value = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        state[name] = value.half()  # the published small.pt is float16
    return state


def _write_whisper(path: Path, dims: dict, generator: torch.Generator) -> None:
    torch.save({"dims": dims, "model_state_dict": random_whisper_state(dims, generator)}, path)


_SYLLABLES = ["ka", "lo", "mi", "ru", "te", "sa", "no", "vi", "da", "pe", "zu", "ho", "ba", "ni", "go", "ly"]


def _pseudo_word(index: int) -> str:
    parts = []
    while True:
        index, digit = divmod(index, len(_SYLLABLES))
        parts.append(_SYLLABLES[digit])
        if index == 0:
            return "Ġ" + "".join(parts)


def write_tiny_tokenizer(path: Path) -> None:
    path.write_text(tiny_tokenizer_json())


@functools.lru_cache(maxsize=1)
def tiny_tokenizer_json() -> str:
    """A byte-level BPE tokenizer whose vocabulary fills the real text range 0..151935 (a few
    hundred trained merges, then pseudo-words), so any text id the model emits decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = ["What is your name? How are you feeling today? What are your hobbies?",
              "Tell me a joke. What is the weather like today? Can you describe your surroundings?",
              "My name is Omni, an assistant that listens and speaks. I like music and books."]
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus * 4, trainer)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    word = 0
    while len(vocab) < TEXT_VOCAB:
        candidate = _pseudo_word(word)
        word += 1
        if candidate not in vocab:
            vocab[candidate] = len(vocab)
    return json.dumps(spec, ensure_ascii=False)


def random_snac(config: dict, seed: int) -> SNAC:
    """SNAC's own initialisation, seeded without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SNAC(**config)


def _write_snac(folder: Path, seed: int) -> None:
    torch.save(random_snac(TINY_SNAC, seed).state_dict(), folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(TINY_SNAC))


def tiny_config(**changes) -> GPTConfig:
    return replace(TINY_GPT, **changes)


def random_model(size: str = "full", *, device=None, dtype=None, seed: int = 0):
    """A MiniOmni with seeded random weights built in memory (no files): ``full`` has the
    published dimensions (and so the real compute cost), ``tiny`` the test dimensions."""
    from tokenizers import Tokenizer

    from ..core.devices import pick_device
    from .codec import Codec, prepare_for_inference
    from .gpt import precision
    from .model import MiniOmni
    from .whisper import AudioEncoder, EncoderDims

    if size not in ("full", "tiny"):
        raise ValueError(f"size must be 'full' or 'tiny', got {size!r}")
    config, dims, snac_config = (FULL_GPT, FULL_WHISPER_DIMS, FULL_SNAC) if size == "full" else (TINY_GPT, TINY_WHISPER_DIMS, TINY_SNAC)
    device = pick_device(device)
    dtype, quantized = precision(dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        gpt = GPT(config)
    gpt.load_state_dict(random_gpt_state(config, generator), assign=True)
    if config.tie_word_embeddings:
        gpt.lm_head.weight = gpt.transformer.wte.weight
    encoder = AudioEncoder(EncoderDims.from_checkpoint(dims))
    prefix = "encoder."
    whisper_state = random_whisper_state(dims, generator)
    encoder.load_state_dict({k[len(prefix):]: v for k, v in whisper_state.items() if k.startswith(prefix)})
    snac = prepare_for_inference(random_snac(snac_config, seed))
    return MiniOmni(
        gpt.placed(device, dtype, quantized),
        encoder.to(device=device, dtype=dtype).eval(),
        Codec(snac.to(device=device, dtype=dtype).eval()),
        Tokenizer.from_str(tiny_tokenizer_json()),
    )


def build(size: str, *, device=None, dtype=None, seed: int = 0, checkpoint=None, codec=None):
    """``zoo.load(..., random_weights=size)``: "tiny" writes the tiny folders in the published
    layout (once per seed) and loads them through the real loader (a given component folder
    replaces its tiny one); "full" builds the published dimensions in memory."""
    from .model import MiniOmni

    if size == "full":
        return random_model("full", device=device, dtype=dtype, seed=seed)
    folders = tiny_checkpoint(seed=seed)
    return MiniOmni.load(device=device, dtype=dtype, checkpoint=checkpoint or folders.checkpoint,
                         codec=codec or folders.codec)
