"""GLM-4-Voice audio decoder (flow matching + HiFT): the published key sets at full size, safe
config reading, strict loading, output lengths, parity with the reference code's outputs on the
tiny checkpoint (fixture made outside the repo), the streaming modes, and no global RNG use."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from zoo.core.errors import CheckpointMismatch
from zoo.glm4_voice.conformer import block_causal_grid, relative_shift
from zoo.glm4_voice.decoder import AudioDecoder, SeamlessStream, SeamlessVocoder, build_modules, hift_published_state
from zoo.glm4_voice.decoder_config import ConfigError, DecoderConfig, read_config, render_config
from zoo.glm4_voice.flow import mel_frames
from zoo.glm4_voice.hift import receptive_field_frames
from zoo.glm4_voice.prompt import LOW_LATENCY_BLOCKS, REFERENCE_BLOCKS
from zoo.glm4_voice.random_weights import write_tiny_decoder

DATA = Path(__file__).parent / "data"
KEYS = {f["file"]: f for f in json.loads((DATA / "keys/glm-4-voice.json").read_text())["files"]}
REFERENCE = json.loads((DATA / "glm_decoder_reference.json").read_text())


def snr(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(10 * np.log10((y**2).sum() / max(((x - y) ** 2).sum(), 1e-300)))


def schedule(n: int, sizes) -> list[list[int]]:
    """Cut n token positions into blocks of sizes[0], sizes[1], ... (the last size repeats)."""
    blocks, start = [], 0
    while start < n:
        size = sizes[min(len(blocks), len(sizes) - 1)]
        blocks.append(list(range(start, min(n, start + size))))
        start += size
    return blocks


def run_stream(stream, tokens, sizes) -> list[np.ndarray]:
    blocks = [[tokens[i] for i in b] for b in schedule(len(tokens), sizes)]
    return [stream.push(b) for b in blocks[:-1]] + [stream.finish(blocks[-1])]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_decoder(tmp_path_factory.mktemp("glm_decoder") / "decoder", seed=0)


@pytest.fixture(scope="module")
def decoder64(folder):
    return AudioDecoder.load(folder, dtype=torch.float64)


@pytest.fixture(scope="module")
def decoder32(folder):
    return AudioDecoder.load(folder, dtype=torch.float32)


# -- layout and loading -------------------------------------------------------------------------


def test_full_size_keys_and_shapes_equal_the_published_lists():
    flow, hift = build_modules(DecoderConfig(), device="meta")
    assert {k: list(v.shape) for k, v in flow.state_dict().items()} == KEYS["flow.pt"]["tensors"]
    assert {k: list(v.shape) for k, v in hift_published_state(hift).items()} == KEYS["hift.pt"]["tensors"]
    assert sum(p.numel() for p in flow.parameters()) == KEYS["flow.pt"]["element_count"]
    assert sum(p.numel() for p in hift.parameters()) == KEYS["hift.pt"]["element_count"]


def test_config_yaml_is_read_without_running_it(tmp_path):
    text = render_config(DecoderConfig())
    assert "!new:cosyvoice.flow.flow.MaskedDiffWithXvec" in text and "!apply:torch.manual_seed [1986]" in text
    (tmp_path / "config.yaml").write_text(text)
    assert read_config(tmp_path / "config.yaml") == DecoderConfig()
    # a tag that would run code when HyperPyYAML loads the file is only recorded
    marker = tmp_path / "ran"
    (tmp_path / "config.yaml").write_text(f"__x: !apply:pathlib.Path.touch [{str(marker)!r}]\n" + text)
    read_config(tmp_path / "config.yaml")
    assert not marker.exists()
    bad = text.replace("block_rel_selfattn", "rel_selfattn")
    (tmp_path / "config.yaml").write_text(bad)
    with pytest.raises(ConfigError, match="selfattention_layer_type"):
        read_config(tmp_path / "config.yaml")
    (tmp_path / "config.yaml").write_text(text.replace("HiFTGenerator", "HiFiGANGenerator"))
    with pytest.raises(ConfigError, match="HiFTGenerator"):
        read_config(tmp_path / "config.yaml")
    with pytest.raises(yaml.YAMLError):  # still a YAML parser: garbage is an error
        (tmp_path / "config.yaml").write_text("flow: [unclosed")
        read_config(tmp_path / "config.yaml")


def test_tiny_folder_round_trip(folder, decoder32):
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "flow.pt", "hift.pt"]
    flow_file = torch.load(folder / "flow.pt", weights_only=True)
    hift_file = torch.load(folder / "hift.pt", weights_only=True)
    assert any(k.endswith("weight_g") for k in hift_file) and not any("parametrizations" in k for k in hift_file)
    assert flow_file.keys() == decoder32.flow.state_dict().keys()
    assert all(torch.equal(flow_file[k], v) for k, v in decoder32.flow.state_dict().items())
    ours = hift_published_state(decoder32.hift)
    assert ours.keys() == hift_file.keys() and all(torch.equal(hift_file[k], v) for k, v in ours.items())
    assert read_config(folder / "config.yaml").flow.vocab_size == 16384


def test_strict_loading_names_missing_and_unexpected_keys(folder, tmp_path):
    for name in ("config.yaml", "flow.pt", "hift.pt"):
        shutil.copy(folder / name, tmp_path / name)
    state = torch.load(folder / "hift.pt", weights_only=True)
    state["conv_post.weight"] = state.pop("conv_post.weight_v")
    del state["f0_predictor.classifier.bias"]
    torch.save(state, tmp_path / "hift.pt")
    with pytest.raises(CheckpointMismatch) as error:
        AudioDecoder.load(tmp_path)
    message = str(error.value)
    assert "conv_post.weight_v" in message and "f0_predictor.classifier.bias" in message  # missing
    assert "unexpected: conv_post.weight" in message and "hift.pt" in message
    state = torch.load(folder / "flow.pt", weights_only=True)
    state["encoder_proj.weight"] = state["encoder_proj.weight"][:, :-1]
    torch.save(state, tmp_path / "flow.pt")
    with pytest.raises(CheckpointMismatch, match=r"encoder_proj.weight: file \(80, 31\), model \(80, 32\)"):
        AudioDecoder.load(tmp_path)
    (tmp_path / "flow.pt").unlink()
    with pytest.raises(Exception, match="flow.pt"):
        AudioDecoder.load(tmp_path)


# -- pieces -------------------------------------------------------------------------------------


def test_block_causal_grid_and_relative_shift():
    grid = block_causal_grid(8, 3)
    assert grid[1].tolist() == [True] * 3 + [False] * 5  # its own block of 3, nothing later
    assert grid[4].tolist() == [True] * 6 + [False] * 2
    scores = torch.arange(5 * 9.0).view(1, 1, 5, 9)  # query i, relative position 4 - k
    shifted = relative_shift(scores)
    for i in range(5):
        for j in range(5):
            assert shifted[0, 0, i, j] == scores[0, 0, i, 4 - (i - j)]


def test_guided_and_unguided_velocity_in_one_batch_equal_two_calls(decoder64):
    estimator = decoder64.flow.decoder.estimator
    g = torch.Generator().manual_seed(0)
    x, mu, cond = (torch.randn(1, 80, 37, generator=g, dtype=torch.float64) for _ in range(3))
    spks = torch.randn(1, 80, generator=g, dtype=torch.float64)
    time = estimator.time_embedding(torch.tensor(0.3, dtype=torch.float64))
    with torch.inference_mode():
        both = estimator(x.expand(2, -1, -1), torch.cat([mu, 0 * mu]), torch.cat([spks, 0 * spks]),
                         torch.cat([cond, 0 * cond]), time)
        guided = estimator(x, mu, spks, cond, time)
        unguided = estimator(x, 0 * mu, 0 * spks, 0 * cond, time)
    torch.testing.assert_close(both, torch.cat([guided, unguided]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 10, 25, 73])
def test_one_pass_length_and_level(decoder32, n):
    tokens = list(np.random.default_rng(n).integers(0, 16384, n))
    audio = decoder32.one_pass(tokens)
    assert audio.dtype == np.float32
    assert len(audio) == int(n / 12.5 * 22050 / 256) * 256 == decoder32.num_samples(n)
    assert 0.005 < audio.std() < 0.3 and (np.abs(audio) >= 0.989).mean() < 0.01  # neither silent nor clipped


def test_mel_frames_follows_the_reference_float32_formula():
    assert [mel_frames(n) for n in (1, 10, 25, 64, 3392)] == [6, 68, 172, 441, 23372]  # 3392: 23373 exactly


# -- parity with the reference code (fixture made by running THUDM/GLM-4-Voice on the same folder)


def check_audio(audio: np.ndarray, expected: dict, atol: float, stride: int) -> None:
    assert len(audio) == expected["n"]
    np.testing.assert_allclose(audio[::stride], expected["strided"], rtol=0, atol=atol)
    x = audio.astype(np.float64)
    scale = max(1.0, abs(expected["sum_abs"]))
    for key, value in (("sum", x.sum()), ("sum_abs", np.abs(x).sum()), ("sum_sq", (x * x).sum()),
                       ("sum_ramp", (x * np.linspace(-1, 1, len(x))).sum())):
        assert abs(value - expected[key]) <= atol * scale, key


def test_one_pass_equals_the_reference_float64(decoder64):
    expected = REFERENCE["float64"]["one_pass"]
    audio, mel = decoder64.one_pass(REFERENCE["tokens"], return_mel=True)
    check_audio(audio, expected["audio"], 1e-6, REFERENCE["stride"])  # float32 output
    np.testing.assert_allclose(mel.mean(0), expected["mel"]["frame_mean"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(mel.mean(1), expected["mel"]["channel_mean"], rtol=0, atol=1e-9)


def test_one_pass_float32_is_close_to_the_reference_float32(decoder32):
    expected = REFERENCE["float32"]["one_pass"]
    audio, mel = decoder32.one_pass(REFERENCE["tokens"], return_mel=True)
    check_audio(audio, expected["audio"], 2e-3, 3 * REFERENCE["stride"])  # the source's phase amplifies rounding
    np.testing.assert_allclose(mel.mean(0), expected["mel"]["frame_mean"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("sizes", [REFERENCE_BLOCKS, LOW_LATENCY_BLOCKS])
def test_reference_stream_equals_the_reference_float64(decoder64, sizes):
    expected = REFERENCE["float64"]["stream " + ",".join(map(str, sizes))]
    tokens = REFERENCE["tokens"]
    assert [len(b) for b in schedule(len(tokens), sizes)] == expected["blocks"]
    stream = decoder64.new_state("reference")
    chunks = run_stream(stream, tokens, sizes)
    for audio, mel, chunk in zip(chunks, stream.returned_mels, expected["chunks"]):
        check_audio(audio, chunk["audio"], 1e-6, REFERENCE["stride"])
        assert mel.size(-1) == chunk["mel"]["frames"]
        np.testing.assert_allclose(mel[0].mean(0).numpy(), chunk["mel"]["frame_mean"], rtol=0, atol=1e-9)
    # the reference loses one frame per block after the first (its returned mels repeat the cache frame)
    lost = (len(chunks) - 2) * 256 if len(chunks) > 1 else 0
    assert sum(map(len, chunks)) == decoder64.num_samples(len(tokens)) - lost


def test_reference_stream_finish_without_a_last_block_returns_the_held_back_tail(decoder32):
    stream = decoder32.new_state("reference")
    first = stream.push(list(range(25)))
    tail = stream.finish()
    assert len(first) == (172 - 34) * 256 - 256 and len(tail) == (34 + 1) * 256
    with pytest.raises(RuntimeError, match="finished"):
        stream.push([1])
    with pytest.raises(ValueError, match="too short for the reference stream"):  # it would crash there
        decoder32.new_state("reference").push([1, 2, 3])


# -- randomness ---------------------------------------------------------------------------------


def test_decoding_never_touches_the_global_rng(decoder32):
    tokens = list(range(100, 160))
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = decoder32.one_pass(tokens)
    for mode in ("reference", "seamless"):
        run_stream(decoder32.new_state(mode), tokens, LOW_LATENCY_BLOCKS)
    assert torch.equal(state, torch.random.get_rng_state())
    torch.manual_seed(7)  # and the output does not depend on it
    assert np.array_equal(decoder32.one_pass(tokens), first)
    assert not np.array_equal(decoder32.one_pass(tokens, seed=43), first)


# -- the seamless stream ------------------------------------------------------------------------


def record_mel(stream: SeamlessStream) -> list[torch.Tensor]:
    """The mel frames the stream commits, as they go to its vocoder."""
    committed, push = [], stream.vocoder.push

    def recording(mel, final):
        committed.append(mel)
        return push(mel, final)

    stream.vocoder.push = recording
    return committed


@pytest.mark.parametrize("sizes", [REFERENCE_BLOCKS, LOW_LATENCY_BLOCKS])
def test_seamless_stream_has_every_sample_and_seamless_vocoding(decoder64, sizes):
    tokens = list(np.random.default_rng(5).integers(0, 16384, 140))
    stream = decoder64.new_state()
    committed = record_mel(stream)
    chunks = run_stream(stream, tokens, sizes)
    audio = np.concatenate(chunks)
    assert len(audio) == decoder64.num_samples(len(tokens))  # nothing dropped, the last block decoded
    mel = torch.cat(committed, dim=2)
    assert mel.size(-1) == mel_frames(len(tokens))
    # vocoding block by block equals one vocoder pass over the same mel with the same randomness
    with torch.inference_mode():
        whole = SeamlessVocoder(decoder64.hift, decoder64._stream_randomness(42), lookahead=0).push(mel, final=True)
    assert snr(audio, whole[0].float().numpy()) > 40
    # and the mel stays near one flow pass with the same (frame-indexed) noise: 5 dB on these
    # random weights, where a different noise draw alone gives -2 dB
    _, one_pass_mel = decoder64.one_pass(tokens, randomness="stream", return_mel=True)
    assert snr(mel[0].numpy(), one_pass_mel) > 3


def test_seamless_stream_takes_any_block_sizes(decoder32):
    tokens = list(np.random.default_rng(7).integers(0, 16384, 12))  # each push is a flow call: keep it short
    stream = decoder32.new_state()
    chunks = [stream.push(tokens[:1]), stream.push([]), stream.push(tokens[1:3]), stream.push([tokens[3]]),
              stream.push(tokens[4:11])]
    chunks.append(stream.finish(tokens[11:]))
    assert sum(map(len, chunks)) == decoder32.num_samples(12)
    assert len(decoder32.new_state().finish()) == 0


def test_seamless_single_block_equals_the_one_pass_with_stream_randomness(decoder64):
    tokens = list(np.random.default_rng(6).integers(0, 16384, 50))
    streamed = decoder64.new_state().finish(tokens)
    one_pass = decoder64.one_pass(tokens, randomness="stream")
    assert snr(streamed, one_pass) > 100


def test_vocoder_chunks_equal_one_pass_given_enough_context(decoder64):
    g = torch.Generator().manual_seed(1)
    mel = torch.randn(1, 80, 300, generator=g, dtype=torch.float64)
    context = receptive_field_frames(decoder64.hift.config)
    with torch.inference_mode():
        whole = SeamlessVocoder(decoder64.hift, decoder64._stream_randomness(3), lookahead=0).push(mel, final=True)
        vocoder = SeamlessVocoder(decoder64.hift, decoder64._stream_randomness(3), lookahead=context)
        cuts = [0, 7, 68, 150, 151, 300]
        parts = [vocoder.push(mel[:, :, a:b], final=b == 300) for a, b in zip(cuts, cuts[1:])]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=0, atol=1e-9)


def test_seamless_cost_per_block_is_bounded(decoder32):
    stream = decoder32.new_state(context_tokens=20)
    windows = []
    flow_forward = decoder32.flow.forward

    def counting(tokens, prompt, noise):
        windows.append(tokens.size(1))
        return flow_forward(tokens, prompt, noise)

    decoder32.flow.forward = counting
    try:
        for _ in range(12):
            stream.push(list(range(25)))
        stream.finish([])
    finally:
        del decoder32.flow.forward
    # each window: the 25 new tokens, <= 20 context tokens rounded to the 10-token grid, the
    # held-back frames' tokens, and a block of slack
    assert max(windows) <= 25 + 20 + 10 + 10 and len(windows) == 12
    assert len(stream.tokens) <= 25 + 20 + 10 + 10 + 10
    assert stream.committed.size(-1) <= mel_frames(60)
