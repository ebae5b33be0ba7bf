"""Hertz-dev loads the published files unchanged: key sets and shapes at full size (built on the
meta device, compared with the published lists, both weight-norm namings), sizes read back from
shapes, strict loading errors, codec length arithmetic and streaming, FSQ index <-> code."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import zoo
from zoo.core.errors import CheckpointMismatch
from zoo.hertz_dev.checkpoint import (
    CODEC_FILE,
    QUANTIZER_FILE,
    VARIANT_FILES,
    codec_config,
    file_keys,
    main_config,
    quantizer_config,
    resynth_config,
)
from zoo.hertz_dev.codec import FRAME, WaveCodec
from zoo.hertz_dev.model import HertzDev
from zoo.hertz_dev.quantizer import FSQ, LatentQuantizer
from zoo.hertz_dev.random_weights import (
    FULL_CODEC,
    FULL_MAIN,
    FULL_QUANTIZER,
    FULL_RESYNTH,
    TINY_CODEC,
    tiny_checkpoint,
)
from zoo.hertz_dev.transformer import HertzLM, MainConfig, ResynthConfig, Resynthesizer

KEYS = {f["file"]: f for f in json.loads((Path(__file__).parent / "data/keys/hertz-dev.json").read_text())["files"]}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread


@pytest.fixture(scope="module")
def tiny_hertz(one_thread):
    return zoo.load("hertz-dev", random_weights="tiny", device="cpu")


@pytest.fixture(scope="module")
def tiny_hertz64(one_thread):
    return zoo.load("hertz-dev", random_weights="tiny", device="cpu", dtype="float64")


def full_size_modules():
    with torch.device("meta"):
        return {
            CODEC_FILE: WaveCodec(FULL_CODEC),
            QUANTIZER_FILE: LatentQuantizer(FULL_QUANTIZER),
            "inference_caraway_112000.pt": HertzLM(FULL_MAIN),
            "inference_syrup_110000.pt": HertzLM(FULL_MAIN),
            "inference_whip_72000.pt": Resynthesizer(FULL_RESYNTH),
            "inference_scion_54000.pt": HertzLM(MainConfig(split=True)),
            "inference_care_50000.pt": Resynthesizer(ResynthConfig(split=True)),
        }


@pytest.mark.parametrize("file", sorted(KEYS))
def test_full_size_keys_and_shapes_equal_the_published_list(file):
    module = full_size_modules()[file]
    assert file_keys(module) == KEYS[file]["tensors"]
    if "tensors_alt" in KEYS[file]:  # the codec's legacy weight_g / weight_v naming
        assert file_keys(module, legacy=True) == KEYS[file]["tensors_alt"]


def test_sizes_are_read_back_from_the_published_shapes():
    def meta(file):
        return {k: torch.empty(v, device="meta") for k, v in KEYS[file]["tensors"].items()}

    assert codec_config(meta(CODEC_FILE)) == FULL_CODEC
    assert quantizer_config(meta(QUANTIZER_FILE)) == FULL_QUANTIZER
    assert main_config(meta("inference_caraway_112000.pt"), "f") == FULL_MAIN
    assert main_config(meta("inference_scion_54000.pt"), "f") == MainConfig(split=True)
    assert resynth_config(meta("inference_whip_72000.pt"), "f") == FULL_RESYNTH
    assert resynth_config(meta("inference_care_50000.pt"), "f") == ResynthConfig(split=True)
    assert FULL_MAIN.head_dim == 128 and FULL_RESYNTH.head_dim == 256 and FULL_RESYNTH.plex_layer == 4


def test_tiny_checkpoint_has_the_published_file_names_and_head_counts(tiny_hertz):
    folder = tiny_checkpoint(seed=0)
    names = {p.name for p in folder.iterdir()}
    assert {CODEC_FILE, QUANTIZER_FILE, *VARIANT_FILES["mono"], *VARIANT_FILES["split"]} <= names
    main, resynth = tiny_hertz.networks("split")
    assert main.config.n_head == 32 and resynth.config.n_head == 16 and main.config.split and resynth.config.split
    assert torch.load(folder / "inference_scion_54000.pt", weights_only=True)["input.weight"].dtype == torch.bfloat16
    assert tiny_hertz.codec.config == TINY_CODEC


@pytest.fixture()
def tiny_copy(tmp_path):
    folder = tmp_path / "hertz"
    shutil.copytree(tiny_checkpoint(seed=0), folder)
    return folder


def _edit(path: Path, change) -> None:
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def test_strict_loading_reports_every_missing_unexpected_and_misshaped_key(tiny_copy):
    main_file, resynth_file = VARIANT_FILES["mono"]

    def damage(state):
        del state["layers.1.attn.attn.norm_q.weight"]
        del state["output.norm.weight"]
        state["layers.0.extra"] = torch.zeros(3)
        state["input.bias"] = torch.zeros(5)

    _edit(tiny_copy / main_file, damage)
    model = HertzDev.load(checkpoint=tiny_copy, device="cpu")
    with pytest.raises(CheckpointMismatch) as err:
        model.networks("mono")
    message = str(err.value)
    for part in ("layers.1.attn.attn.norm_q.weight", "output.norm.weight", "layers.0.extra", "input.bias",
                 "2 missing", "1 unexpected", "1 wrong shape", main_file):
        assert part in message
    assert isinstance(err.value, zoo.WeightsNotFound)


def test_an_unexpected_resynthesizer_key_is_an_error(tiny_copy):
    _edit(tiny_copy / VARIANT_FILES["split"][1], lambda s: s.update({"quantizer.input.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointMismatch, match="1 unexpected: quantizer.input.weight"):
        HertzDev.load(checkpoint=tiny_copy, device="cpu").networks("split")


def test_the_wrong_file_is_refused(tiny_copy):
    shutil.copy(tiny_copy / VARIANT_FILES["split"][0], tiny_copy / VARIANT_FILES["mono"][0])  # split main as mono
    with pytest.raises(zoo.WeightsNotFound, match="not the mono networks"):
        HertzDev.load(checkpoint=tiny_copy, device="cpu").networks("mono")


def test_codec_missing_key_is_an_error_and_extra_keys_a_warning(tiny_copy):
    _edit(tiny_copy / CODEC_FILE, lambda s: s.update({"discriminator.weight": torch.zeros(4)}))
    with pytest.warns(UserWarning, match="discriminator.weight"):
        HertzDev.load(checkpoint=tiny_copy, device="cpu")
    _edit(tiny_copy / CODEC_FILE, lambda s: s.pop("decoder.res_stack.6.conv.parametrizations.weight.original0"))
    missing = r"1 missing: decoder.res_stack.6.conv.parametrizations.weight.original0"
    with pytest.raises(CheckpointMismatch, match=missing):
        HertzDev.load(checkpoint=tiny_copy, device="cpu")


def test_codec_legacy_weight_norm_naming_loads_the_same_weights(tiny_copy, tiny_hertz):
    def legacy(state):
        for key in [k for k in state if ".parametrizations.weight.original" in k]:
            layer, which = key.split(".parametrizations.weight.original")
            state[layer + (".weight_g" if which == "0" else ".weight_v")] = state.pop(key)

    _edit(tiny_copy / CODEC_FILE, legacy)
    model = HertzDev.load(checkpoint=tiny_copy, device="cpu")
    for (name, a), (_, b) in zip(model.codec.state_dict().items(), tiny_hertz.codec.state_dict().items()):
        assert torch.equal(a, b), name


def test_missing_files_are_one_clear_error(tmp_path, tiny_copy):
    with pytest.raises(zoo.WeightsNotFound) as err:
        zoo.load("hertz-dev", checkpoint=tmp_path, device="cpu")
    assert "--checkpoint DIR" in str(err.value) and "--tiny" in str(err.value) and CODEC_FILE in str(err.value)
    for name in VARIANT_FILES["split"]:  # one complete set is enough to load; the other fails on use
        (tiny_copy / name).unlink()
    model = zoo.load("hertz-dev", checkpoint=tiny_copy, device="cpu")
    with pytest.raises(zoo.WeightsNotFound, match="inference_scion_54000.pt"):
        model.duplex()


class NotATensor:
    """Something a pickle may carry and weights_only loading must refuse."""


def test_checkpoints_load_with_weights_only(tiny_copy):
    torch.save({"input.weight": NotATensor()}, tiny_copy / QUANTIZER_FILE)
    with pytest.raises(zoo.WeightsNotFound, match="not a readable torch checkpoint"):
        HertzDev.load(checkpoint=tiny_copy, device="cpu")


# -- codec -------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames", [1, 3, 7])
def test_codec_length_arithmetic(tiny_hertz, frames):
    codec = tiny_hertz.codec
    audio = 0.1 * torch.randn(1, 1, frames * FRAME, generator=torch.Generator().manual_seed(frames))
    with torch.inference_mode():
        mu, logvar = codec.posterior(audio)
        assert mu.shape == logvar.shape == (1, frames, 32)
        assert codec.decode(mu).shape == (1, 1, frames * FRAME)


def test_codec_streams_frame_by_frame_exactly(tiny_hertz64):
    """Encoding 2000-sample frames and decoding single latents through stream states gives the
    one-pass numbers (every layer is causal)."""
    codec = tiny_hertz64.codec
    audio = 0.2 * torch.randn(1, 1, 6 * FRAME, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.inference_mode():
        mu, _ = codec.posterior(audio)
        state = codec.encoder_state(1)
        streamed = torch.cat([codec.posterior(audio[..., k * FRAME : (k + 1) * FRAME], state)[0] for k in range(6)], 1)
        torch.testing.assert_close(streamed, mu, rtol=0, atol=1e-12)
        with pytest.raises(ValueError, match="whole frames"):
            codec.posterior(audio[..., :100], state)
        whole = codec.decode(mu)
        state = codec.decoder_state(1)
        pieces = torch.cat([codec.decode(mu[:, k : k + 1], state) for k in range(6)], -1)
        torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-12)


def test_decoder_context_covers_its_receptive_field(tiny_hertz64):
    codec = tiny_hertz64.codec
    n = codec.decoder_context()
    z = torch.randn(1, n + 3, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.inference_mode():
        reference = codec.decode(z)
        z2 = z.clone()
        z2[0, 0] += 1.0
        changed = (codec.decode(z2) - reference).abs()[0, 0] > 0
    last_frame_changed = int(torch.nonzero(changed).max()) // FRAME
    assert last_frame_changed < n  # a latent no longer matters n frames later


# -- FSQ -----------------------------------------------------------------------------------------
def test_fsq_index_code_round_trip():
    fsq = FSQ(8)
    indices = torch.arange(32768)
    codes = fsq.indices_to_codes(indices)
    assert codes.shape == (32768, 5)
    assert sorted(codes.unique().tolist()) == [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75]
    assert torch.equal(fsq.codes_to_indices(codes), indices)
    assert fsq._basis.tolist() == [1, 8, 64, 512, 4096]
    assert fsq.indices_to_codes(torch.tensor(1 * 1 + 2 * 8 + 7 * 4096)).tolist() == [-0.75, -0.5, -1.0, -1.0, 0.75]
    z = torch.randn(1000, 5, generator=torch.Generator().manual_seed(0)) * 3
    quantized = fsq.quantize(z)
    assert torch.equal(fsq.indices_to_codes(fsq.codes_to_indices(quantized)), quantized)
    # bound() keeps every value strictly inside the 8 levels
    assert quantized.min() >= -1.0 and quantized.max() <= 0.75


def test_quantizer_indices_are_spread_on_the_tiny_checkpoint(tiny_hertz):
    latents = torch.randn(1, 200, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        embedding, indices = tiny_hertz.quantizer(latents)
    assert embedding.shape == (1, 200, 32) and indices.unique().numel() > 100


def test_card():
    card = zoo.card("hertz-dev")
    assert card.duplex and card.frame_samples == 2000
    assert card.input_sample_rate == card.output_sample_rate == 16000
    assert dict(card.components) == {"checkpoint": "si-pbc/hertz-dev"}
    assert np.isclose(card.frame_samples / card.output_sample_rate, 0.125)


def test_duplex_sessions_hold_the_reference_servers_context_by_default():
    """The reference inference_server.py caches 1024 positions in both transformers; so do our duplex
    sessions by default (then they slide on, where that server stops). At full size in bfloat16
    that is 0.625 GiB of KV cache per session, against 2 GiB at the trained 2048 / 8192 contexts:
    the caches bound how many sessions a GPU holds (computed on the meta device)."""
    import inspect

    import torch

    from zoo.hertz_dev.duplex import SERVER_CONTEXT, DuplexStepper
    from zoo.hertz_dev.engine import Engine
    from zoo.hertz_dev.model import HertzDev
    from zoo.hertz_dev.random_weights import FULL_MAIN, FULL_QUANTIZER, FULL_RESYNTH
    from zoo.hertz_dev.transformer import (
        MAIN_CONTEXT,
        RESYNTH_CONTEXT,
        HertzLM,
        MainConfig,
        ResynthConfig,
        Resynthesizer,
    )

    assert SERVER_CONTEXT == 1024
    for factory in (DuplexStepper.__init__, HertzDev.duplex_stepper, HertzDev.duplex):
        defaults = inspect.signature(factory).parameters
        assert defaults["main_context"].default == defaults["resynth_context"].default == SERVER_CONTEXT
    with torch.device("meta"):
        main = HertzLM(MainConfig(**{**FULL_MAIN.__dict__, "split": True})).to(torch.bfloat16)
        resynth = Resynthesizer(ResynthConfig(**{**FULL_RESYNTH.__dict__, "split": True})).to(torch.bfloat16)
        quantizer = LatentQuantizer(FULL_QUANTIZER)

    def per_session(main_context, resynth_context):
        engine = Engine(main, resynth, quantizer, 1, main_context=main_context, resynth_context=resynth_context,
                        out_channels=(1,))
        return engine.nbytes() / 2**30

    assert per_session(SERVER_CONTEXT, SERVER_CONTEXT) == 0.625
    assert per_session(MAIN_CONTEXT, RESYNTH_CONTEXT) == 2.0
