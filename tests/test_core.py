"""zoo.core: audio input, options, sampling, checkpoint resolution."""
import io
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from zoo.core.audio import float_to_pcm16, load_audio, pcm16_to_float
from zoo.core.checkpoints import resolve_files
from zoo.core.errors import AudioInputError, OptionsError, WeightsNotFound
from zoo.core.sampling import Sampling, sample_rows
from zoo.mini_omni.model import MiniOmniOptions


def tone(rate, seconds=1.0, channels=1, freq=440.0):
    t = np.arange(int(rate * seconds)) / rate
    mono = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono] * channels, axis=1)


def wav_bytes(audio, rate, subtype="PCM_16"):
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
def test_any_rate_becomes_target_rate_with_same_duration_and_pitch(rate):
    out = load_audio(wav_bytes(tone(rate), rate), target_rate=16000)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(out.size - 16000) <= 2
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * 16000 / out.size - 440) < 2  # pitch preserved


def test_stereo_file_and_channel_first_array_are_averaged_to_mono():
    stereo = tone(16000, channels=2)
    stereo[:, 1] = 0.0
    from_file = load_audio(wav_bytes(stereo, 16000), target_rate=16000)
    np.testing.assert_allclose(from_file, stereo[:, 0] / 2, atol=1e-4)
    from_array = load_audio(stereo.T.copy(), 16000, target_rate=16000)
    np.testing.assert_allclose(from_array, stereo[:, 0] / 2, atol=1e-6)


def test_int16_arrays_are_scaled():
    pcm = (tone(16000) * 32767).astype(np.int16)
    np.testing.assert_allclose(load_audio(pcm, 16000, target_rate=16000), tone(16000), atol=1e-4)


@pytest.mark.parametrize(
    "source, rate, message",
    [
        (np.zeros(0, np.float32), 16000, "empty"),
        (np.array([0.1, np.nan, 0.2], np.float32), 16000, "NaN"),
        (b"this is not audio at all", None, "could not decode"),
        (np.zeros(16000 * 31, np.float32), 16000, "at most 30 s"),
        (np.zeros(100, np.float32), None, "sample_rate"),
        (np.array(["a", "b"]), 16000, "numbers"),
    ],
)
def test_bad_audio_gets_a_clear_error(source, rate, message):
    with pytest.raises(AudioInputError, match=message):
        load_audio(source, rate, target_rate=16000, max_seconds=30)


def test_silence_is_valid_input():
    assert np.all(load_audio(np.zeros(16000, np.float32), 16000, target_rate=16000) == 0)


def test_pcm16_clips_instead_of_wrapping():
    pcm = np.frombuffer(float_to_pcm16(np.array([1.5, -1.5, 0.5], np.float32)).tobytes(), "<i2")
    assert pcm.tolist() == [32767, -32767, 16384]


def test_pcm16_truncation_and_scales_are_declared_choices():
    audio = np.array([0.99999, -0.99999, 0.50002, -0.3], np.float32)
    assert float_to_pcm16(audio, rounding="truncate").tolist() == (audio * 32767).astype(np.int16).tolist()
    assert float_to_pcm16(audio).tolist() == (audio * 32767).round().astype(np.int16).tolist()
    pcm = np.array([-32768, -1, 0, 16384, 32767], "<i2").tobytes()
    assert pcm16_to_float(pcm).tolist() == [-1.0, -1 / 32768, 0.0, 0.5, 32767 / 32768]
    assert pcm16_to_float(pcm + b"\x01", scale=32767.0)[-1] == 1.0  # a trailing odd byte is ignored
    with pytest.raises(ValueError):
        float_to_pcm16(audio, rounding="floor")


def test_options_from_untrusted_values():
    opts = MiniOmniOptions.from_dict({"temperature": 0.5, "top_k": 3, "stream_stride": 2})
    assert (opts.temperature, opts.top_k, opts.stream_stride) == (0.5, 3, 2)
    assert MiniOmniOptions.from_dict({"top_k": None, "max_new_tokens": 30.0}).max_new_tokens == 30
    assert MiniOmniOptions().temperature == 0.9 and MiniOmniOptions().top_k == 1  # reference defaults
    for bad, message in [({"bogus": 1}, "unknown"), ({"temperature": -1}, "temperature"),
                         ({"top_p": 0}, "top_p"), ({"stream_stride": 0}, "stream_stride"),
                         ({"max_new_tokens": "many"}, "max_new_tokens"), ({"stream_mode": "x"}, "stream_mode"),
                         ({"max_new_tokens": 2.7}, "max_new_tokens"), ({"top_k": True}, "top_k"),
                         ({"temperature": None}, "cannot be null"), ({"codec_noise": "yes"}, "codec_noise"),
                         ({"max_new_tokens": "10"}, "must be int"), ({"temperature": "0.5"}, "must be float"),
                         ({"codec_noise": 1}, "must be bool"), ({"stream_mode": 5}, "must be str"),
                         ({"temperature": float("nan")}, "finite"), ({"top_p": float("inf")}, "finite"),
                         ({"seed": -1}, "seed"), ({"seed": 2**63}, "seed"), ({"temperature": 10**400}, "out of range")]:
        with pytest.raises(OptionsError, match=message):
            MiniOmniOptions.from_dict(bad)


def expected(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float) -> torch.Tensor:
    """The references' (litgpt's) rules written out: top-k, temperature, then top-p (the tokens
    whose ascending cumulative probability stays within 1 - top_p go, never the most probable)."""
    z = logits.double().clone()
    if top_k is not None:
        z[z < z.topk(top_k).values[-1]] = float("-inf")
    p = (z / temperature).softmax(-1)
    if top_p < 1.0:
        order = p.argsort()
        drop = p[order].cumsum(0) <= 1.0 - top_p
        drop[-1] = False
        p[order[drop]] = 0.0
    return p / p.sum()


def test_rows_draw_the_references_distribution_each_with_its_own_settings():
    """sample_rows: the distribution of the references' rules for every row's settings (top-k,
    temperature, top-p), never a token those rules exclude; greedy rows exact."""
    logits = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.5, -1.0, -3.0, 0.0])
    n = 4000
    settings = [(1.0, 3, 1.0), (0.7, None, 0.8), (1.3, 5, 0.9), (0.8, None, 1.0)]  # the last: no sort
    for temperature, top_k, top_p in settings:
        g = torch.Generator().manual_seed(3)
        drawn, unusable = sample_rows(logits.expand(n, -1), [Sampling(temperature, top_k, top_p, g)] * n)
        assert not unusable.any()
        p = expected(logits, temperature, top_k, top_p)
        assert set(drawn.tolist()) <= set(torch.nonzero(p).flatten().tolist()), (temperature, top_k, top_p)
        frequencies = torch.bincount(drawn, minlength=8).double() / n
        assert (frequencies - p).abs().max() < 0.03, (temperature, top_k, top_p)
    rows = logits.repeat(4, 1)
    rows[2, 3] = float("nan")
    mixed, unusable = sample_rows(rows, [Sampling(t, k, 1.0, torch.Generator().manual_seed(i))
                                         for i, (t, k) in enumerate([(0.0, None), (1.0, 1), (0.9, None), (1e-9, 50)])])
    assert mixed.tolist()[0] == 0 and mixed.tolist()[1] == 0 and mixed.tolist()[3] == 0  # greedy rows
    assert unusable.tolist() == [False, False, True, False]  # said, not raised: the others' draws stand
    # sessions of several rows each (a model's codebooks): tokens per row, unusable per session
    codebooks = logits.repeat(3, 4, 1)
    codebooks[1, 2, 0] = float("inf")
    tokens, unusable = sample_rows(codebooks, [Sampling(0.0, None, 1.0, None)] + [
        Sampling(1.0, 3, 1.0, torch.Generator().manual_seed(i)) for i in range(2)])
    assert tokens.shape == (3, 4) and tokens[0].tolist() == [0] * 4 and set(tokens[2].tolist()) <= {0, 1, 2}
    assert unusable.tolist() == [False, True, False]


def test_a_rows_draw_depends_on_its_own_generator_only():
    vocab = 64
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(2))

    def draw(rows, seeds):
        return sample_rows(logits[rows], [Sampling(1.0, 20, 0.95, torch.Generator().manual_seed(s))
                                          for s in seeds])[0]

    together = draw([0, 1, 2, 3, 4], [10, 11, 12, 13, 14])
    alone = torch.cat([draw([i], [10 + i]) for i in range(5)])
    assert torch.equal(together, alone)  # batch companions change nothing
    assert torch.equal(draw([0, 1], [7, 8]), draw([0, 1], [7, 8]))  # a seed is a replay
    state = torch.random.get_rng_state()
    assert len({tuple(draw([0, 1, 2, 3, 4], [s] * 5).tolist()) for s in range(20)}) > 1
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched


def test_local_folder_missing_files_names_them(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(WeightsNotFound, match=r"lacks \['b.bin'\].*--checkpoint DIR.*tiny"):
        resolve_files(tmp_path, ["a.txt", "b.bin"], component="checkpoint")
    assert resolve_files(tmp_path, ["a.txt"], component="checkpoint") == tmp_path


def test_hub_offline_without_cache_fails_fast_and_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    started = time.monotonic()
    with pytest.raises(WeightsNotFound, match="gpt-omni/mini-omni.*HF_HUB_OFFLINE.*--codec DIR"):
        resolve_files("gpt-omni/mini-omni", ["lit_model.pth"], component="codec")
    assert time.monotonic() - started < 10
