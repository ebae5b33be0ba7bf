"""Tiny GLM-4-Voice checkpoints in the published layouts, for tests (random weights: noise).
So far: the speech tokenizer folder (config.json, preprocessor_config.json, model.safetensors)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from .speech_tokenizer import SpeechTokenizerEncoder, TokenizerConfig

TINY_TOKENIZER = replace(TokenizerConfig(), d_model=64, encoder_attention_heads=4, encoder_ffn_dim=128,
                         quantize_position=2, pooling_position=2)
# whisper-large-v3's feature extractor settings, as glm-4-voice-tokenizer publishes them
PREPROCESSOR = dict(chunk_length=30, feature_extractor_type="WhisperFeatureExtractor", feature_size=128,
                    hop_length=160, n_fft=400, n_samples=480000, nb_max_frames=3000, padding_side="right",
                    padding_value=0.0, processor_class="WhisperProcessor", return_attention_mask=False,
                    sampling_rate=16000)


def random_tokenizer_state(config: TokenizerConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded random weights with the published names (on the generator's device)."""
    with torch.device("meta"):
        names = SpeechTokenizerEncoder(config).state_dict()
    device = generator.device

    def randn(shape):
        return torch.randn(shape, generator=generator, device=device)

    state = {}
    for name, tensor in names.items():
        if name == "ema_count":
            state[name] = torch.ones(tensor.shape, device=device)
        elif name.endswith("layer_norm.weight"):
            state[name] = 1 + 0.05 * randn(tensor.shape)
        elif name.endswith(".bias"):
            state[name] = 0.02 * randn(tensor.shape)
        elif name in ("codebook.weight", "ema_weight"):  # codes as large as the hidden states
            state[name] = randn(tensor.shape)
        else:
            fan_in = tensor.shape[1] * (tensor.shape[2] if tensor.dim() == 3 else 1) if tensor.dim() > 1 else 1
            state[name] = randn(tensor.shape) / (fan_in**0.5)
    return state


def write_tiny_tokenizer(folder: Path, seed: int = 0, config: TokenizerConfig = TINY_TOKENIZER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    state = random_tokenizer_state(config, torch.Generator().manual_seed(seed))
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})  # as save_pretrained writes it
    published = {**asdict(config), "architectures": ["WhisperVQEncoder"], "model_type": "whisper",
                 "encoder_layers": 32, "num_hidden_layers": 32, "vocab_size": 51866, "torch_dtype": "float32",
                 "quantize_ema_decay": 0.99, "quantize_restart_interval": 100, "quantize_loss_scale": 10.0,
                 "quantize_commit_coefficient": 0.25, "skip_language_detection": True}
    (folder / "config.json").write_text(json.dumps(published, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    return folder


# GLM-4-Voice-9B's config.json fields (ChatGLM names) at tiny width, with the real vocabulary size
TINY_LLM_CONFIG = dict(
    model_type="chatglm", architectures=["ChatGLMForConditionalGeneration"], num_layers=2, hidden_size=64,
    ffn_hidden_size=96, num_attention_heads=4, kv_channels=16, multi_query_attention=True, multi_query_group_num=2,
    add_qkv_bias=True, add_bias_linear=False, rmsnorm=True, post_layer_norm=True,
    apply_residual_connection_post_layernorm=False, apply_query_key_layer_scaling=True,
    attention_softmax_in_fp32=True, original_rope=True, rope_ratio=1, layernorm_epsilon=1.5625e-07,
    padded_vocab_size=168960, vocab_size=168960, seq_length=8192, pad_token_id=151329,
    eos_token_id=[151329, 151336, 151338], torch_dtype="bfloat16", tie_word_embeddings=False,
)


def write_tiny_llm(folder: Path, seed: int = 0, config: dict = TINY_LLM_CONFIG, shards: int = 2,
                   with_inv_freq: bool = True, tilt_head: bool = False) -> Path:
    """Sharded bf16 safetensors with the published ChatGLM tensor names, plus the index.
    ``tilt_head``: the output layer of ``tiny_checkpoint`` (see TINY_HEAD_SCALE)."""
    from .llm import glm_config, published_names

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    names = published_names(glm_config(config))
    tensors = {}
    for name, shape in names.items():
        value = 1 + 0.05 * torch.randn(shape, generator=generator) if "layernorm" in name else \
            0.02 * torch.randn(shape, generator=generator)
        if "query_key_value" in name:  # sharp attention: a wrong RoPE or scale then changes the ids
            value = value * 8
        if name == "transformer.output_layer.weight" and tilt_head:
            value = _tilt_head(value)
        tensors[name] = value.to(torch.bfloat16)
    if with_inv_freq:
        rot = config["kv_channels"] // 2
        tensors["transformer.rotary_pos_emb.inv_freq"] = (1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)).to(torch.bfloat16)
    ordered = list(tensors)
    weight_map = {}
    for i in range(shards):
        part = ordered[i::shards]
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, folder / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


TEXT_VOCABULARY = 151329  # ordinary BPE ranks of the published tokenizer.model: specials start here
# ids of the added tokens the LLM's config and the reference code rely on (published numbering)
ADDED_TOKENS = {"<|begin_of_audio|>": 151343, "<|end_of_audio|>": 151344}
AUDIO_OFFSET = 152353  # <|audio_0|>


def write_tiny_text_tokenizer(folder: Path) -> Path:
    """tokenizer.model + tokenizer_config.json with the published numbering: 151329 ranks (bytes,
    then 2-, 3- and 4-letter pieces: a real BPE, but not GLM-4's merges), the 14 built-in specials
    after them, <|begin_of_audio|>/<|end_of_audio|> and the 16384 audio tokens at their ids."""
    import base64
    import itertools
    import string

    from .text_tokenizer import BUILTIN_SPECIALS

    folder.mkdir(parents=True, exist_ok=True)
    pieces = [bytes([b]) for b in range(256)]
    seen = set(pieces)
    printable = string.ascii_letters + string.digits + string.punctuation + " "
    lower = " " + string.ascii_lowercase
    candidates = itertools.chain(
        ("".join(p) for p in itertools.product(printable, repeat=2)),
        ("".join(p) for p in itertools.product(lower, repeat=3)),
        ("".join(p) for p in itertools.product(lower, repeat=4)),
    )
    for text in candidates:
        if len(pieces) == TEXT_VOCABULARY:
            break
        piece = text.encode()
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)
    (folder / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(p).decode()} {rank}\n" for rank, p in enumerate(pieces)))
    added = {token: TEXT_VOCABULARY + i for i, token in enumerate(BUILTIN_SPECIALS)}
    added.update(ADDED_TOKENS)
    added.update({f"<|audio_{i}|>": AUDIO_OFFSET + i for i in range(16384)})
    decoder = {str(index): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True} for token, index in added.items()}
    config = {"added_tokens_decoder": decoder, "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
              "clean_up_tokenization_spaces": False, "do_lower_case": False, "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "model_input_names": ["input_ids", "attention_mask", "position_ids"],
              "model_max_length": 128000, "padding_side": "left", "remove_space": False,
              "tokenizer_class": "ChatGLM4Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return folder


TINY_FORMAT = 2  # bump when the tiny folders change, so cached copies are rewritten
# The tiny LLM's output layer: sharper than its random init (a peaked distribution, as a trained
# model's) and tilted towards the audio ids, so tiny replies mix text and audio blocks.
TINY_HEAD_SCALE, TINY_AUDIO_TILT = 8.0, 1.15
# published config.json of glm-4-voice-9b (vox-serve mirror; see the upstream notes)
FULL_LLM_CONFIG = dict(TINY_LLM_CONFIG, num_layers=40, hidden_size=4096, ffn_hidden_size=13696,
                       num_attention_heads=32, kv_channels=128, layernorm_epsilon=1.5625e-07)


@dataclass(frozen=True)
class TinyFolders:
    llm: Path
    tokenizer: Path
    decoder: Path


def tiny_checkpoint(seed: int = 0, root=None) -> TinyFolders:
    """The three tiny folders (llm, tokenizer, decoder) for ``seed``, written once and reused."""
    from ..core.tiny import cached_folder

    def write(folder: Path) -> None:
        write_tiny_llm(folder / "llm", seed=seed, tilt_head=True)
        write_tiny_text_tokenizer(folder / "llm")
        write_tiny_tokenizer(folder / "tokenizer", seed=seed)
        write_tiny_decoder(folder / "decoder", seed=seed)

    target = cached_folder(f"glm-4-voice-v{TINY_FORMAT}-seed{seed}", write, root)
    return TinyFolders(target / "llm", target / "tokenizer", target / "decoder")


def _tilt_head(head: torch.Tensor, first_row: int = 0) -> torch.Tensor:
    """The tilted output layer (in float32) of rows ``first_row``.. of the head."""
    head = head.float() * TINY_HEAD_SCALE
    head[max(AUDIO_OFFSET - first_row, 0) : max(AUDIO_OFFSET + 16384 - first_row, 0)] *= TINY_AUDIO_TILT
    return head


def random_llm(size: str = "tiny", *, device, dtype, quantized: str | None = None, seed: int = 0):
    """GlmForCausalLM at the published ("full", 19 GB in bf16) or tiny size with seeded random
    weights, built directly on ``device`` part by part (embedding, each decoder layer, final
    norm, head) in parameter order, so a seed gives the same values at every precision. With
    ``quantized`` ("int8", "int4") each decoder layer is packed (zoo.core.quantize) as soon as it is
    drawn, the head kept in ``dtype`` (load_llm's rule): the device never holds more than one
    layer in full precision, which is what lets the int4 network fit a 12 GB card."""
    from transformers import GlmForCausalLM
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    from ..core.quantize import quantize_linears
    from .llm import glm_config

    config = glm_config(FULL_LLM_CONFIG if size == "full" else TINY_LLM_CONFIG)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        llm = GlmForCausalLM(config).to(dtype)
    layers = [f"model.layers.{i}" for i in range(config.num_hidden_layers)]
    for prefix in ["model.embed_tokens", *layers, "model.norm", "lm_head"]:
        part = llm.get_submodule(prefix).to_empty(device=device)
        with torch.no_grad():
            for name, p in part.named_parameters(prefix=prefix):
                p.normal_(1.0, 0.05, generator=generator) if "norm" in name else p.normal_(0.0, 0.02, generator=generator)
        if quantized and prefix in layers:  # drawn on the device, packed on the way back
            quantize_linears(part.cpu(), quantized, dtype, device)
    with torch.no_grad():  # a block of rows at a time: a float32 copy of the full head is 2.8 GB
        head = llm.lm_head.weight
        for start in range(0, head.shape[0], 8192):
            head[start : start + 8192].copy_(_tilt_head(head[start : start + 8192], start))
    llm.model.rotary_emb = GlmRotaryEmbedding(config).to(device)
    return llm.eval()


def random_model(size: str = "tiny", *, device=None, dtype=None, seed: int = 0):
    """GLM-4-Voice with seeded random weights built in memory on ``device``: "full" has the
    published sizes (the real compute cost; 19 GB in bf16), "tiny" the test ones. Noise out."""
    from ..core.devices import pick_device
    from ..core.tiny import cached_folder
    from .model import GlmVoice, precision
    from .speech_tokenizer import SpeechTokenizer
    from .text_tokenizer import GlmTokenizer

    if size not in ("full", "tiny"):
        raise ValueError(f"size must be 'full' or 'tiny', got {size!r}")
    device = pick_device(device)
    llm_dtype, quantized, side_dtype = precision(dtype, device)
    llm = random_llm(size, device=device, dtype=llm_dtype, quantized=quantized, seed=seed)
    text = cached_folder("glm-4-voice-text-tokenizer", write_tiny_text_tokenizer)
    tokenizer_config = TokenizerConfig() if size == "full" else TINY_TOKENIZER
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    speech = SpeechTokenizer.build(tokenizer_config, PREPROCESSOR, random_tokenizer_state(tokenizer_config, generator),
                                   device=device, dtype=side_dtype)
    decoder = random_decoder(size, device=device, dtype=side_dtype, seed=seed)
    return GlmVoice(llm, speech, GlmTokenizer.load(text), decoder)


def build(size: str, *, device=None, dtype=None, seed: int = 0, llm=None, tokenizer=None, decoder=None):
    """``zoo.load(..., random_weights=size)``: "tiny" writes the three tiny folders in the
    published layouts (once per seed) and loads them through the real loader (a given component
    folder replaces its tiny one); "full" builds the published sizes in memory."""
    from .model import GlmVoice

    if size == "full":
        return random_model("full", device=device, dtype=dtype, seed=seed)
    folders = tiny_checkpoint(seed=seed)
    return GlmVoice.load(device=device, dtype=dtype, llm=llm or folders.llm,
                         tokenizer=tokenizer or folders.tokenizer, decoder=decoder or folders.decoder)


# -- the audio decoder (glm-4-voice-decoder: config.yaml, flow.pt, hift.pt) ---------------------

def _tiny_decoder_config():
    from .decoder_config import DecoderConfig, FlowConfig, HiftConfig

    # the real vocabulary, mel (80 bins, 22050 Hz, 256 samples per frame), kernel sizes and
    # schedules; narrow layers, few of them
    flow = replace(FlowConfig(), input_size=32, encoder_size=32, encoder_heads=2, encoder_linear_units=64,
                   encoder_blocks=2, estimator_channels=(32, 32), attention_head_dim=16, num_heads=2, n_blocks=1,
                   num_mid_blocks=2)
    return DecoderConfig(flow, replace(HiftConfig(), base_channels=32, f0_cond_channels=32))


TINY_DECODER = _tiny_decoder_config()


def random_decoder_state(config, generator: torch.Generator) -> tuple[dict, dict]:
    """Seeded random (flow.pt, hift.pt) state dicts with the published names, scaled so that the
    audio is neither silent nor clipped: unit-norm weight-norm rows, f0 around 40 Hz (some frames
    unvoiced, below 10 Hz), iSTFT magnitudes around exp(-3), attention made sharp (so a wrong
    position term or mask changes the output)."""
    from .decoder import build_modules, hift_published_state

    flow, hift = build_modules(config, device="meta")
    device = generator.device

    def randn(shape) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=generator, device=device)

    def init(name: str, shape: torch.Size) -> torch.Tensor:
        if name.endswith("weight_g"):  # the norm of each output channel's weights
            return (0.3 if name.startswith("conv_post") else 1.0) * (1 + 0.1 * randn(shape))
        if name.endswith(".alpha"):  # Snake
            return 1 + 0.2 * randn(shape)
        if name.endswith(("pos_bias_u", "pos_bias_v")):
            return 0.5 * randn(shape)
        if name == "f0_predictor.classifier.bias":
            return torch.full(tuple(shape), 40.0, device=device)
        if name == "f0_predictor.classifier.weight":
            return 30 * randn(shape) / shape[-1] ** 0.5
        if name == "conv_post.bias":  # log-magnitudes first, then phases
            bias = 0.1 * randn(shape)
            bias[: shape[0] // 2] -= 3
            return bias
        if len(shape) == 1:
            norm = any(part in name for part in ("norm", "block.1.", "model.1.", "model.4.", "model.7.", "model.10.",
                                                 "embed.out.1."))
            return (1 + 0.1 * randn(shape)) if norm and name.endswith("weight") else 0.05 * randn(shape)
        fan_in = shape[1] * (shape[2] if len(shape) == 3 else 1)
        if "ups." in name or "upsample" in name or (name.startswith("decoder") and ".2.conv." in name and len(shape) == 3
                                                   and shape[0] == shape[1] and shape[2] == 4):
            fan_in = shape[0] * shape[2] // 2  # transposed convs: (in, out, k), stride 2 or 8
        scale = 2.0 if name.endswith(("linear_q.weight", "linear_k.weight", "to_q.weight", "to_k.weight")) else 1.0
        if name == "input_embedding.weight":
            return randn(shape)
        return scale * randn(shape) / fan_in**0.5

    flow_state = {name: init(name, t.shape) for name, t in flow.state_dict().items()}
    hift_state = {name: init(name, t.shape) for name, t in hift_published_state(hift).items()}
    return flow_state, hift_state


def write_tiny_decoder(folder: Path, seed: int = 0, config=TINY_DECODER) -> Path:
    """config.yaml (the published text with tiny numbers), flow.pt and hift.pt (plain torch.save'd
    float32 state dicts with the published names, hift.pt with legacy weight_g/weight_v)."""
    from .decoder_config import render_config

    folder.mkdir(parents=True, exist_ok=True)
    flow_state, hift_state = random_decoder_state(config, torch.Generator().manual_seed(seed))
    (folder / "config.yaml").write_text(render_config(config))
    torch.save(flow_state, folder / "flow.pt")
    torch.save(hift_state, folder / "hift.pt")
    return folder


def random_decoder(size: str = "tiny", *, device=None, dtype: torch.dtype = torch.float32, seed: int = 0):
    """An AudioDecoder with seeded random weights built in memory: "tiny" is the test checkpoint
    (the same weights ``write_tiny_decoder`` writes), "full" the published sizes (the real compute
    cost). Noise out."""
    from .decoder import AudioDecoder, build_modules
    from .decoder_config import DecoderConfig
    from .hift import published_to_module_keys

    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    config = TINY_DECODER if size == "tiny" else DecoderConfig()
    flow_state, hift_state = random_decoder_state(config, torch.Generator().manual_seed(seed))
    flow, hift = build_modules(config, device="meta")
    flow.load_state_dict(flow_state, strict=True, assign=True)
    hift.load_state_dict(published_to_module_keys(hift_state), strict=True, assign=True)
    device = torch.device(device or "cpu")
    return AudioDecoder(flow.to(device=device, dtype=dtype), hift.to(device=device, dtype=dtype))
