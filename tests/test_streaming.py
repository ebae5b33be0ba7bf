"""zoo.core.streaming, the one streaming vocabulary, over every model's codec or audio decoder
(SNAC, GLM-4-Voice's flow + HiFT, the Hertz-dev codec, Mimi): a sequence streamed piece by piece
through new_state / step / finish gives each one's documented one-pass result, finish and reset
leave a state fresh (the same pieces give the same output again), and a batched state's rows
stream independently."""
import numpy as np
import pytest
import torch
from conftest import snr_db

from zoo.core.streaming import CausalStreamingModule, StreamingModule, StreamingState
from zoo.glm4_voice.decoder import AudioDecoder
from zoo.glm4_voice.random_weights import write_tiny_decoder
from zoo.hertz_dev.codec import FRAME, WaveCodec
from zoo.hertz_dev.random_weights import TINY_CODEC
from zoo.mini_omni.codec import CONTEXT_FRAMES, Codec, load_snac
from zoo.moshi.mimi import FRAME_SAMPLES as MIMI_FRAME
from zoo.moshi.mimi import Mimi, MimiConfig, MimiStream
from zoo.moshi.tiny_config import TINY_MIMI


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


# -- the batched causal codecs: Hertz-dev's and Mimi (Moshi) ------------------------------------
@pytest.fixture(scope="module")
def hertz_codec():
    torch.manual_seed(0)
    return WaveCodec(TINY_CODEC).double().eval()


@pytest.fixture(scope="module")
def mimi():
    torch.manual_seed(0)
    return Mimi(MimiConfig.from_dict(TINY_MIMI)).double().eval()


def joined(outputs: list, axis: int) -> torch.Tensor:
    """Outputs joined along the sequence (an encoder's (mean, log-variance): their means)."""
    return torch.cat([o[0] if isinstance(o, tuple) else o for o in outputs], dim=axis)


def row_of(state, row: int) -> list[torch.Tensor]:
    """Everything a batched state holds for one session row (copies)."""
    if isinstance(state, MimiStream):  # convolution buffers, and the transformer's ring cache
        return [*row_of(state.buffers, row), state.cache.k[:, row].clone(), state.cache.v[:, row].clone()]
    return [v[row].clone() for v in state.buffers.values()]


def check_batched_causal_half(module: CausalStreamingModule, sequence: torch.Tensor, one_pass: torch.Tensor, *,
                              in_axis: int, cut: int, out_axis: int) -> None:
    """Two sessions in slots 2 and 0 of a 3-slot state (slot 1 idle) stream ``sequence`` (batch 2,
    six output steps of ``cut`` inputs along ``in_axis``) in pieces of 1, 3 and 2 steps: joined
    along ``out_axis``, the outputs are ``one_pass``; the idle slot is untouched; finish leaves the
    rows fresh; a slot reset mid-stream restarts alone while the other goes on."""
    rows = torch.tensor([2, 0])
    pieces = [sequence.narrow(in_axis, a * cut, (b - a) * cut) for a, b in ((0, 1), (1, 4), (4, 6))]
    state = module.new_state(3)
    idle = row_of(state, 1)

    first = joined(stream_pieces(module, state, pieces, rows=rows), out_axis)
    torch.testing.assert_close(first, one_pass, rtol=0, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(row_of(state, 1), idle, strict=True))
    again = joined(stream_pieces(module, state, pieces, rows=rows), out_axis)
    torch.testing.assert_close(again, first, rtol=0, atol=0)  # finish left the rows fresh
    # slot 0 restarts mid-stream (a new session) while slot 2 goes on
    module.step(state, pieces[0], rows=rows)
    module.reset(state, rows=torch.tensor([0]))
    restarted = module.step(state, pieces[0][:1], rows=torch.tensor([0]))
    alone = module.step(module.new_state(1), pieces[0][:1])
    torch.testing.assert_close(restarted, alone, rtol=0, atol=0)
    # nothing is held back: finish without a last piece is an empty output for the rows
    empty = module.finish(module.new_state(2))
    for out, whole in zip(empty if isinstance(empty, tuple) else (empty,),
                          first if isinstance(first, tuple) else (first,)):
        assert out.size(0) == 2 and out.size(out_axis) == 0 and out.dtype == whole.dtype


@torch.inference_mode()
def test_hertz_codec_halves_stream_rows_as_one_pass(hertz_codec):
    codec = hertz_codec
    audio = 0.2 * torch.randn(2, 1, 6 * FRAME, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mu, _ = codec.posterior(audio)
    check_batched_causal_half(codec.streaming_encoder, audio, mu, in_axis=-1, cut=FRAME, out_axis=1)
    check_batched_causal_half(codec.streaming_decoder, mu, codec.decode(mu), in_axis=1, cut=1, out_axis=-1)


@torch.inference_mode()
def test_mimi_halves_stream_rows_as_frame_by_frame(mimi):
    """Mimi (zoo.moshi) through the same vocabulary as the Hertz-dev codec. Its "one pass" is the
    stream frame by frame (the reference server's schedule, checked against the reference in
    test_moshi_reference); six frames cross the tiny transformers' 8-latent context."""
    audio = 0.2 * torch.randn(2, 1, 6 * MIMI_FRAME, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    encoding, decoding = mimi.streaming_encoder, mimi.streaming_decoder

    def frame_by_frame(module, sequence: torch.Tensor, cut: int) -> torch.Tensor:
        state = module.new_state(2)
        return torch.cat([module.step(state, piece) for piece in sequence.split(cut, dim=-1)], dim=-1)

    codes = frame_by_frame(encoding, audio, MIMI_FRAME)
    assert codes.shape == (2, mimi.num_codebooks, 6) and codes.dtype == torch.long
    check_batched_causal_half(encoding, audio, codes, in_axis=-1, cut=MIMI_FRAME, out_axis=-1)
    check_batched_causal_half(decoding, codes, frame_by_frame(decoding, codes, 1), in_axis=-1, cut=1, out_axis=-1)
