"""The numbers of ``glm-4-voice-decoder/config.yaml``, read safely.

The published file is HyperPyYAML: ``!new:module.Class`` tags build objects and ``!apply:`` tags
call functions (it even reseeds the global RNGs) when the reference code loads it. We never run
any of that. A ``yaml.SafeLoader`` records every custom tag as a :class:`Tagged` value, ``!ref
<name>`` is resolved against the top-level keys, and only the numbers the forward pass needs are
read into :class:`FlowConfig` and :class:`HiftConfig`. The class named by each tag is checked, so
a config for another architecture fails with a clear error instead of loading into the wrong
modules. :func:`render_config` writes the published layout back (the tiny checkpoints use it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class FlowConfig:
    """``flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec`` and its nested modules."""

    vocab_size: int = 16384
    input_size: int = 512  # token embedding width (= the encoder's input)
    output_size: int = 80  # mel bins
    spk_embed_dim: int = 192
    input_frame_rate: float = 12.5  # tokens per second
    # encoder: BlockConformerEncoder
    encoder_size: int = 512
    encoder_heads: int = 8
    encoder_linear_units: int = 2048
    encoder_blocks: int = 6
    encoder_block_size: int = 10  # tokens per block of the block-causal mask
    # length_regulator: InterpolateRegulator
    regulator_layers: int = 4  # len(sampling_ratios)
    # decoder: ConditionalCFM
    inference_cfg_rate: float = 0.7
    t_scheduler: str = "cosine"
    # decoder.estimator: ConditionalDecoder
    estimator_in_channels: int = 320  # x, mu, speaker and cond, 80 each
    estimator_channels: tuple[int, ...] = (256, 256)
    attention_head_dim: int = 64
    num_heads: int = 8
    n_blocks: int = 4
    num_mid_blocks: int = 12


@dataclass(frozen=True)
class HiftConfig:
    """``hift: !new:cosyvoice.hifigan.generator.HiFTGenerator`` and its f0 predictor."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 22050
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 8)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16)
    istft_n_fft: int = 16
    istft_hop: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5),) * 3
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5),) * 2
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_cond_channels: int = 512

    @property
    def samples_per_frame(self) -> int:
        """Output samples per mel frame: the upsampling rates times the iSTFT hop (8*8*4 = 256)."""
        product = self.istft_hop
        for rate in self.upsample_rates:
            product *= rate
        return product


@dataclass(frozen=True)
class DecoderConfig:
    flow: FlowConfig = field(default_factory=FlowConfig)
    hift: HiftConfig = field(default_factory=HiftConfig)


@dataclass(frozen=True)
class Tagged:
    """A YAML value carrying a custom tag, e.g. ``!new:cosyvoice.flow.flow.MaskedDiffWithXvec``."""

    tag: str
    value: Any


class _RecordingLoader(yaml.SafeLoader):
    """SafeLoader that keeps custom tags as data instead of refusing (or executing) them."""


def _construct_tagged(loader: _RecordingLoader, suffix: str, node: yaml.Node) -> Tagged:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return Tagged("!" + suffix, value)


_RecordingLoader.add_multi_constructor("!", _construct_tagged)

# What each part of the published file must instantiate, and the options our modules implement.
EXPECTED_CLASSES = {
    ("flow",): "cosyvoice.flow.flow.MaskedDiffWithXvec",
    ("flow", "encoder"): "cosyvoice.transformer.encoder.BlockConformerEncoder",
    ("flow", "length_regulator"): "cosyvoice.flow.length_regulator.InterpolateRegulator",
    ("flow", "decoder"): "cosyvoice.flow.flow_matching.ConditionalCFM",
    ("flow", "decoder", "estimator"): "cosyvoice.flow.decoder.ConditionalDecoder",
    ("hift",): "cosyvoice.hifigan.generator.HiFTGenerator",
    ("hift", "f0_predictor"): "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor",
}
SUPPORTED_OPTIONS = {
    ("flow",): dict(output_type="mel"),
    ("flow", "encoder"): dict(input_layer="linear", pos_enc_layer_type="rel_pos_espnet",
                              selfattention_layer_type="block_rel_selfattn", normalize_before=True,
                              use_cnn_module=False, macaron_style=False),
    ("flow", "decoder", "estimator"): dict(act_fn="gelu", out_channels=80),
    ("hift", "f0_predictor"): dict(num_class=1),
}


class ConfigError(ValueError):
    pass


def _resolve_refs(value: Any, top: dict, where: Path) -> Any:
    """Replace ``!ref <name>`` by the top-level value ``name`` (the only form the file uses)."""
    if isinstance(value, Tagged):
        if value.tag == "!ref":
            match = re.fullmatch(r"<(\w+)>", str(value.value).strip())
            if not match or match.group(1) not in top:
                raise ConfigError(f"{where}: cannot resolve {value.tag} {value.value!r}")
            return _resolve_refs(top[match.group(1)], top, where)
        return Tagged(value.tag, _resolve_refs(value.value, top, where))
    if isinstance(value, dict):
        return {k: _resolve_refs(v, top, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_refs(v, top, where) for v in value]
    return value


def _section(root: dict, path: tuple[str, ...], where: Path) -> dict:
    node: Any = root
    for key in path:
        node = node.value if isinstance(node, Tagged) else node
        if not isinstance(node, dict) or key not in node:
            raise ConfigError(f"{where}: missing '{'.'.join(path)}'")
        node = node[key]
    if not isinstance(node, Tagged) or not node.tag.startswith("!new:"):
        raise ConfigError(f"{where}: '{'.'.join(path)}' should be a !new: object")
    expected = EXPECTED_CLASSES[path]
    if node.tag != f"!new:{expected}":
        raise ConfigError(f"{where}: '{'.'.join(path)}' is {node.tag}, expected !new:{expected}")
    args = node.value if isinstance(node.value, dict) else {}
    for name, wanted in SUPPORTED_OPTIONS.get(path, {}).items():
        if name in args and args[name] != wanted:
            raise ConfigError(f"{where}: {'.'.join(path)}.{name}={args[name]!r} is not supported (expected {wanted!r})")
    return args


def read_config(path: Path) -> DecoderConfig:
    """config.yaml -> DecoderConfig, without executing anything in it. Values the file leaves out
    take the reference code's defaults (which are the published values)."""
    path = Path(path)
    root = yaml.load(path.read_text(), Loader=_RecordingLoader)  # noqa: S506 - a SafeLoader subclass
    if not isinstance(root, dict):
        raise ConfigError(f"{path}: not a YAML mapping")
    root = _resolve_refs(root, root, path)
    flow = _section(root, ("flow",), path)
    encoder = _section(root, ("flow", "encoder"), path)
    regulator = _section(root, ("flow", "length_regulator"), path)
    cfm = _section(root, ("flow", "decoder"), path)
    estimator = _section(root, ("flow", "decoder", "estimator"), path)
    hift = _section(root, ("hift",), path)
    f0 = _section(root, ("hift", "f0_predictor"), path)
    cfm_params = cfm.get("cfm_params")
    cfm_params = cfm_params.value if isinstance(cfm_params, Tagged) else cfm_params or {}
    cfm_params = cfm_params.get("content", cfm_params)
    if cfm_params.get("solver", "euler") != "euler":
        raise ConfigError(f"{path}: flow.decoder.cfm_params.solver={cfm_params['solver']!r} is not supported")
    d = FlowConfig()
    flow_config = FlowConfig(
        vocab_size=int(flow.get("vocab_size", d.vocab_size)),
        input_size=int(flow.get("input_size", d.input_size)),
        output_size=int(flow.get("output_size", d.output_size)),
        spk_embed_dim=int(flow.get("spk_embed_dim", d.spk_embed_dim)),
        input_frame_rate=float(flow.get("input_frame_rate", d.input_frame_rate)),
        encoder_size=int(encoder.get("output_size", d.encoder_size)),
        encoder_heads=int(encoder.get("attention_heads", d.encoder_heads)),
        encoder_linear_units=int(encoder.get("linear_units", d.encoder_linear_units)),
        encoder_blocks=int(encoder.get("num_blocks", d.encoder_blocks)),
        encoder_block_size=int(encoder.get("block_size", d.encoder_block_size)),
        regulator_layers=len(regulator.get("sampling_ratios", [1] * d.regulator_layers)),
        inference_cfg_rate=float(cfm_params.get("inference_cfg_rate", d.inference_cfg_rate)),
        t_scheduler=str(cfm_params.get("t_scheduler", d.t_scheduler)),
        estimator_in_channels=int(estimator.get("in_channels", d.estimator_in_channels)),
        estimator_channels=tuple(int(c) for c in estimator.get("channels", d.estimator_channels)),
        attention_head_dim=int(estimator.get("attention_head_dim", d.attention_head_dim)),
        num_heads=int(estimator.get("num_heads", d.num_heads)),
        n_blocks=int(estimator.get("n_blocks", d.n_blocks)),
        num_mid_blocks=int(estimator.get("num_mid_blocks", d.num_mid_blocks)),
    )
    if int(encoder.get("input_size", flow_config.input_size)) != flow_config.input_size:
        raise ConfigError(f"{path}: flow.encoder.input_size must equal flow.input_size")
    if flow_config.estimator_in_channels != 4 * flow_config.output_size:
        raise ConfigError(f"{path}: estimator in_channels must be 4 x {flow_config.output_size} (x, mu, speaker, cond)")
    if int(regulator.get("channels", flow_config.output_size)) != flow_config.output_size:
        raise ConfigError(f"{path}: flow.length_regulator.channels must equal flow.output_size")
    h = HiftConfig()
    istft = hift.get("istft_params", {})
    hift_config = HiftConfig(
        in_channels=int(hift.get("in_channels", h.in_channels)),
        base_channels=int(hift.get("base_channels", h.base_channels)),
        nb_harmonics=int(hift.get("nb_harmonics", h.nb_harmonics)),
        sampling_rate=int(hift.get("sampling_rate", h.sampling_rate)),
        nsf_alpha=float(hift.get("nsf_alpha", h.nsf_alpha)),
        nsf_sigma=float(hift.get("nsf_sigma", h.nsf_sigma)),
        nsf_voiced_threshold=float(hift.get("nsf_voiced_threshold", h.nsf_voiced_threshold)),
        upsample_rates=tuple(int(r) for r in hift.get("upsample_rates", h.upsample_rates)),
        upsample_kernel_sizes=tuple(int(k) for k in hift.get("upsample_kernel_sizes", h.upsample_kernel_sizes)),
        istft_n_fft=int(istft.get("n_fft", h.istft_n_fft)),
        istft_hop=int(istft.get("hop_len", h.istft_hop)),
        resblock_kernel_sizes=tuple(int(k) for k in hift.get("resblock_kernel_sizes", h.resblock_kernel_sizes)),
        resblock_dilation_sizes=tuple(tuple(int(d) for d in ds) for ds in
                                      hift.get("resblock_dilation_sizes", h.resblock_dilation_sizes)),
        source_resblock_kernel_sizes=tuple(int(k) for k in hift.get("source_resblock_kernel_sizes",
                                                                    h.source_resblock_kernel_sizes)),
        source_resblock_dilation_sizes=tuple(tuple(int(d) for d in ds) for ds in
                                             hift.get("source_resblock_dilation_sizes", h.source_resblock_dilation_sizes)),
        lrelu_slope=float(hift.get("lrelu_slope", h.lrelu_slope)),
        audio_limit=float(hift.get("audio_limit", h.audio_limit)),
        f0_cond_channels=int(f0.get("cond_channels", h.f0_cond_channels)),
    )
    if int(f0.get("in_channels", hift_config.in_channels)) != hift_config.in_channels:
        raise ConfigError(f"{path}: hift.f0_predictor.in_channels must equal hift.in_channels")
    if hift_config.in_channels != flow_config.output_size:
        raise ConfigError(f"{path}: hift.in_channels ({hift_config.in_channels}) != flow.output_size ({flow_config.output_size})")
    return DecoderConfig(flow_config, hift_config)


def render_config(config: DecoderConfig = DecoderConfig()) -> str:
    """The published config.yaml text (layout, comments and the unused ``llm:`` block verbatim)
    with ``config``'s numbers filled in."""
    f, h = config.flow, config.hift

    def seq(values) -> str:
        return "[" + ", ".join(seq(v) if isinstance(v, tuple) else str(v) for v in values) + "]"

    values = {name.name: getattr(f, name.name) for name in fields(f)}
    values.update({f"hift_{name.name}": getattr(h, name.name) for name in fields(h)})
    values = {k: seq(v) if isinstance(v, tuple) else v for k, v in values.items()}
    return _PUBLISHED_TEMPLATE.format(regulator_ratios=seq((1,) * f.regulator_layers), **values)


# THUDM/glm-4-voice-decoder config.yaml, with {fields} where our dataclasses put their values.
_PUBLISHED_TEMPLATE = """\
# set random seed, so that you may reproduce your result.
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

# fixed params
sample_rate: {hift_sampling_rate}
text_encoder_input_size: 512
llm_input_size: 1024
llm_output_size: 1024
spk_embed_dim: {spk_embed_dim}

# model params
# for all class/function included in this repo, we use !<name> or !<new> for intialization, so that user may find all corresponding class/function according to one single yaml.
# for system/third_party class/function, we do not require this.
llm: !new:cosyvoice.llm.llm.TransformerLM
    text_encoder_input_size: !ref <text_encoder_input_size>
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    text_token_size: 51866
    speech_token_size: 4096
    length_normalized_loss: True
    lsm_weight: 0
    spk_embed_dim: !ref <spk_embed_dim>
    text_encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        input_size: !ref <text_encoder_input_size>
        output_size: 1024
        attention_heads: 8
        linear_units: 2048
        num_blocks: 3
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        use_cnn_module: False
        macaron_style: False
        use_dynamic_chunk: False
        use_dynamic_left_chunk: False
        static_chunk_size: 1
    llm: !new:cosyvoice.transformer.encoder.TransformerEncoder
        input_size: !ref <llm_input_size>
        output_size: !ref <llm_output_size>
        attention_heads: 8
        linear_units: 2048
        num_blocks: 7
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0
        input_layer: 'linear_legacy'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        static_chunk_size: 1

flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: {input_size}
    output_size: {output_size}
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {vocab_size}
    input_frame_rate: {input_frame_rate}
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.BlockConformerEncoder
        output_size: {encoder_size}
        attention_heads: {encoder_heads}
        linear_units: {encoder_linear_units}
        num_blocks: {encoder_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'block_rel_selfattn'
        block_size: {encoder_block_size}
        input_size: {input_size}
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: {output_size}
        sampling_ratios: {regulator_ratios}
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: {output_size}
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: '{t_scheduler}'
                training_cfg_rate: 0.2
                inference_cfg_rate: {inference_cfg_rate}
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: {estimator_in_channels}
            out_channels: {output_size}
            channels: {estimator_channels}
            dropout: 0
            attention_head_dim: {attention_head_dim}
            n_blocks: {n_blocks}
            num_mid_blocks: {num_mid_blocks}
            num_heads: {num_heads}
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: {hift_in_channels}
    base_channels: {hift_base_channels}
    nb_harmonics: {hift_nb_harmonics}
    sampling_rate: !ref <sample_rate>
    nsf_alpha: {hift_nsf_alpha}
    nsf_sigma: {hift_nsf_sigma}
    nsf_voiced_threshold: {hift_nsf_voiced_threshold:g}
    upsample_rates: {hift_upsample_rates}
    upsample_kernel_sizes: {hift_upsample_kernel_sizes}
    istft_params:
        n_fft: {hift_istft_n_fft}
        hop_len: {hift_istft_hop}
    resblock_kernel_sizes: {hift_resblock_kernel_sizes}
    resblock_dilation_sizes: {hift_resblock_dilation_sizes}
    source_resblock_kernel_sizes: {hift_source_resblock_kernel_sizes}
    source_resblock_dilation_sizes: {hift_source_resblock_dilation_sizes}
    lrelu_slope: {hift_lrelu_slope}
    audio_limit: {hift_audio_limit}
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: {hift_in_channels}
        cond_channels: {hift_f0_cond_channels}
"""
