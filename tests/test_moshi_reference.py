"""Moshi against its reference (kyutai-labs/moshi run outside this repository on the tiny
published-layout folder, float64 CPU, greedy; tests/data/moshi_reference.npz, see its 'about'):
two sessions streamed the way moshi/server.py streams a connection. The same files through
zoo.load must give the same Mimi codes, the same text and audio tokens and the same audio."""
from pathlib import Path

import numpy as np
import pytest
import torch

import zoo

pytestmark = pytest.mark.usefixtures("one_thread")
REF = np.load(Path(__file__).parent / "data" / "moshi_reference.npz")
FRAME = 1920


@pytest.fixture(scope="module")
def moshi64(_tiny_cache):
    return zoo.load("moshi", random_weights="tiny", device="cpu", dtype="float64")


def test_the_fixture_says_how_it_was_made():
    about = str(REF["about"])
    assert "kyutai-labs/moshi at commit" in about and "use_sampling=False" in about


@torch.inference_mode()
def test_mimi_streams_the_reference_codes_and_audio(moshi64):
    """Encoder frame by frame (reset after the first frame, as the server) and decoder frame by
    frame over the reference's output codes: codes equal, audio equal to float64 rounding."""
    encoding, decoding = moshi64.mimi.streaming_encoder, moshi64.mimi.streaming_decoder
    for s in range(2):
        audio = torch.from_numpy(REF[f"input_{s}"])
        encoder, decoder = encoding.new_state(1), decoding.new_state(1)
        codes = []
        for i in range(audio.numel() // FRAME):
            codes.append(encoding.step(encoder, audio[i * FRAME:(i + 1) * FRAME][None, None])[0, :, 0])
            if i == 0:
                encoding.reset(encoder)
        np.testing.assert_array_equal(torch.stack(codes).numpy(), REF[f"user_codes_{s}"])
        answer = torch.from_numpy(REF[f"audio_codes_{s}"]).T[None]  # (1, 8, T)
        pcm = torch.cat([decoding.step(decoder, answer[..., t:t + 1]) for t in range(answer.shape[-1])], -1)
        np.testing.assert_allclose(pcm[0, 0].numpy(), REF[f"pcm_{s}"], rtol=0, atol=1e-12)


def test_batched_greedy_duplex_equals_the_reference(moshi64):
    """Both reference sessions at once in one duplex stepper (Options(temperature=0): greedy for
    text and every codebook): the first step answers silence (the reference sends nothing), then
    every step's text token, 8 audio codes and 1920 samples are the reference's."""
    stepper = moshi64.duplex_stepper(3)
    handles = [stepper.open(zoo.Options(temperature=0.0)) for _ in range(2)]
    inputs = [REF[f"input_{s}"].astype(np.float64) for s in range(2)]
    texts, codes, audio, pieces = [[], []], [[], []], [[], []], [[], []]
    steps = inputs[0].size // FRAME
    for i in range(steps):
        # the model runs in float64: the frames go in at full precision (float32 would round them)
        frames = [x[i * FRAME:(i + 1) * FRAME] for x in inputs]
        outs = stepper.step(handles, frames)
        for s, (h, out) in enumerate(zip(handles, outs)):
            assert not isinstance(out, Exception), out
            if i < int(REF[f"first_output_frame_{s}"]):
                assert h.tokens is None and h.text == "" and not out.any()
                continue
            texts[s].append(int(h.tokens[0]))
            codes[s].append(h.tokens[1:].numpy())
            audio[s].append(out)
            pieces[s].append(h.text)
    for s in range(2):
        np.testing.assert_array_equal(texts[s], REF[f"text_{s}"])
        np.testing.assert_array_equal(np.stack(codes[s]), REF[f"audio_codes_{s}"])
        np.testing.assert_allclose(np.concatenate(audio[s]), np.clip(REF[f"pcm_{s}"], -1, 1), rtol=0, atol=1e-6)
        expected = [moshi64.piece(t) for t in REF[f"text_{s}"]]
        assert pieces[s] == expected and any(expected)
        assert all(p == "" for t, p in zip(REF[f"text_{s}"], pieces[s]) if t in (0, 3))


@torch.inference_mode()
def test_a_bfloat16_lm_still_hears_the_user_in_mimis_float32(_tiny_cache):
    """The reference loads Mimi in float32 beside a bfloat16 LM and feeds it the float32 frame;
    the batched duplex step must not round the user's audio to the LM's bfloat16 first."""
    model = zoo.load("moshi", random_weights="tiny", device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.mimi.dtype == torch.float32
    stepper = model.duplex_stepper(1)
    handle = stepper.open({"seed": 0})
    seen = []
    encode = model.mimi.encode_step

    def spy(state, x, **kwargs):
        seen.append(x)
        return encode(state, x, **kwargs)

    model.mimi.encode_step = spy
    frame = torch.from_numpy(REF["input_0"][:FRAME]).float().numpy()
    stepper.step([handle], [frame])
    del model.mimi.encode_step
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0][0, 0], torch.from_numpy(frame))
