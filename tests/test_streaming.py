"""zoo.core.streaming, the one streaming vocabulary, over the three audio decoders: a sequence
streamed piece by piece through new_state / step / finish gives each decoder's documented
one-pass result, finish and reset leave a state fresh (the same pieces give the same output
again), and a batched state's rows stream independently."""
import numpy as np
import pytest
import torch
from conftest import snr_db

from zoo.core.streaming import StreamingModule, StreamingState
from zoo.glm4_voice.decoder import AudioDecoder
from zoo.glm4_voice.random_weights import write_tiny_decoder
from zoo.hertz_dev.codec import FRAME, WaveCodec
from zoo.hertz_dev.random_weights import TINY_CODEC
from zoo.mini_omni.codec import CONTEXT_FRAMES, Codec, load_snac


def stream_pieces(module: StreamingModule, state: StreamingState, pieces: list, **rows) -> list:
    """Every piece but the last through ``step``, the last through ``finish``."""
    return [module.step(state, piece, **rows) for piece in pieces[:-1]] + [module.finish(state, pieces[-1], **rows)]


def assert_same_arrays(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread


# -- Mini-Omni: SNAC, one reply per state -------------------------------------------------------
@pytest.fixture(scope="module")
def snac(tiny_folders):
    return Codec(load_snac(tiny_folders.codec, torch.float64, "cpu"))


def test_snac_stream_equals_the_one_pass_decode(snac):
    frames = torch.randint(0, 4096, (13, 7), generator=torch.Generator().manual_seed(0))
    pieces = [frames[:1].tolist(), frames[1:2].tolist(), frames[2:7].tolist(), frames[7:].tolist()]
    state = snac.new_state(stride=4, lookahead=CONTEXT_FRAMES, mode="seamless", seed=0, noise=True, first_chunk=1)
    outputs = stream_pieces(snac, state, pieces)
    # frame 0 is a chunk of its own, but it waits for its 3 frames of right context
    assert [o.size for o in outputs[:2]] == [0, 0]
    audio = np.concatenate(outputs)
    one_pass = snac.decode(frames)
    assert audio.size == one_pass.size and snr_db(one_pass, audio) > 200
    assert_same_arrays(stream_pieces(snac, state, pieces), outputs)  # finish left the state fresh
    snac.step(state, pieces[2])
    snac.reset(state)
    assert_same_arrays(stream_pieces(snac, state, pieces), outputs)
    with pytest.raises(TypeError, match="no rows"):
        snac.step(state, pieces[0], rows=torch.tensor([0]))


# -- GLM-4-Voice: flow + HiFT, one utterance per state ------------------------------------------
@pytest.fixture(scope="module")
def glm_decoder(tmp_path_factory):
    return AudioDecoder.load(write_tiny_decoder(tmp_path_factory.mktemp("glm") / "decoder", seed=0))


def test_glm_reference_stream_in_one_block_is_the_one_pass_decode(glm_decoder):
    tokens = np.random.default_rng(1).integers(0, 16384, 30).tolist()
    state = glm_decoder.new_state("reference")
    # web_demo.py's last call, token2wav(finalize=True) over every token, is the one-pass decode
    assert np.array_equal(glm_decoder.finish(state, tokens), glm_decoder.one_pass(tokens))


def test_glm_seamless_stream_through_the_vocabulary(glm_decoder):
    tokens = np.random.default_rng(2).integers(0, 16384, 40).tolist()
    pieces = [tokens[:10], [], tokens[10:25], tokens[25:]]
    state = glm_decoder.new_state("seamless")
    outputs = stream_pieces(glm_decoder, state, pieces)
    assert sum(o.size for o in outputs) == glm_decoder.num_samples(len(tokens))  # every sample, none twice
    # the stream's own push / finish are the same calls
    own = glm_decoder.new_state("seamless")
    assert_same_arrays([own.push(p) for p in pieces[:-1]] + [own.finish(pieces[-1])], outputs)
    assert_same_arrays(stream_pieces(glm_decoder, state, pieces), outputs)  # finish left the state fresh
    glm_decoder.step(state, pieces[0])
    glm_decoder.reset(state)
    assert_same_arrays(stream_pieces(glm_decoder, state, pieces), outputs)
    # a single block is the one-pass decode with the stream's frame-indexed noise
    single = glm_decoder.finish(state, tokens)
    assert snr_db(glm_decoder.one_pass(tokens, randomness="stream"), single) > 100


# -- Hertz-dev: the causal codec, batched over session rows --------------------------------------
@pytest.fixture(scope="module")
def hertz_codec():
    torch.manual_seed(0)
    return WaveCodec(TINY_CODEC).double().eval()


def joined(outputs: list) -> torch.Tensor:
    """Encoder outputs (mean, log-variance) joined over latents, decoder outputs over samples."""
    if isinstance(outputs[0], tuple):
        return torch.cat([mean for mean, _ in outputs], dim=1)
    return torch.cat(outputs, dim=-1)


@torch.inference_mode()
def test_hertz_codec_halves_stream_rows_as_one_pass(hertz_codec):
    codec = hertz_codec
    audio = 0.2 * torch.randn(2, 1, 6 * FRAME, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mu, _ = codec.posterior(audio)
    encoding, decoding = codec.streaming_encoder, codec.streaming_decoder
    rows = torch.tensor([2, 0])  # two sessions in slots 2 and 0 of a 3-slot state; slot 1 is idle
    for module, sequence, one_pass, cut in ((encoding, audio, mu, FRAME), (decoding, mu, codec.decode(mu), 1)):
        state = module.new_state(3)
        axis = -1 if module is encoding else 1
        pieces = [sequence.narrow(axis, a * cut, (b - a) * cut) for a, b in ((0, 1), (1, 4), (4, 6))]

        first = joined(stream_pieces(module, state, pieces, rows=rows))
        torch.testing.assert_close(first, one_pass, rtol=0, atol=1e-12)
        assert all(not b[1].any() for b in state.buffers.values()) and bool(state.fresh[1])  # the idle slot
        again = joined(stream_pieces(module, state, pieces, rows=rows))
        torch.testing.assert_close(again, first, rtol=0, atol=0)  # finish left the rows fresh
        # slot 0 restarts mid-stream (a new session) while slot 2 goes on
        module.step(state, pieces[0], rows=rows)
        module.reset(state, rows=torch.tensor([0]))
        restarted = module.step(state, pieces[0][:1], rows=torch.tensor([0]))
        alone = module.step(module.new_state(1), pieces[0][:1])
        torch.testing.assert_close(restarted, alone, rtol=0, atol=0)
    # nothing is held back by a causal codec: finish without a last piece is empty
    state = decoding.new_state(2)
    assert decoding.finish(state).shape == (2, 1, 0)
    assert [t.shape for t in encoding.finish(encoding.new_state(2))] == [(2, 0, 32)] * 2
