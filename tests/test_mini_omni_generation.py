"""Mini-Omni on the tiny checkpoint (float64, CPU): every task, the delay pattern, the KV cache,
batched sessions, and streamed audio against the one-pass decode of the same codes."""
import numpy as np
import pytest
import torch
from conftest import snr_db

from zoo.mini_omni.codec import CONTEXT_FRAMES, AudioStreamer
from zoo.mini_omni.engine import Session
from zoo.mini_omni.prompts import TASKS, audio_question, text_question
from zoo.mini_omni.tokens import (
    ANSWER_A,
    ANSWER_T,
    ASR,
    EOA,
    EOT,
    INPUT_A,
    INPUT_T,
    PAD_A,
    PAD_T,
    layershift,
)

LIMIT = {"max_new_tokens": 30}


def run(model, task, **inputs):
    session, reply = model.start_session(task, options=inputs.pop("options", LIMIT), **inputs)
    chunks = list(model._stream(reply))
    return session, chunks


def frames_of(outputs):
    """The reference's reconscruct_snac: layer j's frame f sits at output position f + j + 1."""
    return [[outputs[f + 1 + j][j] for j in range(7)] for f in range(len(outputs) - 7)]


def test_prompts_match_the_reference_layout():
    batch = audio_question(TASKS["A1A2+A1T2"], 3)
    assert batch.shape == (2, 8, 6)
    assert batch[0, 0].tolist() == [layershift(x, 0) for x in [INPUT_A, PAD_A, PAD_A, PAD_A, EOA, ANSWER_A]]
    assert batch[1, 6].tolist() == [layershift(x, 6) for x in [INPUT_A, PAD_A, PAD_A, PAD_A, EOA, PAD_A]]
    assert batch[0, 7].tolist() == batch[1, 7].tolist() == [INPUT_T, PAD_T, PAD_T, PAD_T, EOT, ANSWER_T]
    assert audio_question(TASKS["ASR"], 2)[0, 7, -1] == ASR
    assert audio_question(TASKS["A1T2"], 2)[0, 0, -1] == layershift(PAD_A, 0)
    ta = text_question(TASKS["T1A2"], [11, 12])
    assert ta[0, 7].tolist() == [INPUT_T, 11, 12, EOT, ANSWER_T]
    assert ta[0, 3].tolist() == [layershift(x, 3) for x in [PAD_A] * 4 + [ANSWER_A]]
    assert text_question(TASKS["T1T2"], [5])[0, 2, -1] == layershift(PAD_A, 2)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_runs_and_streams(tiny64, question_wav, task):
    path = question_wav[0]
    inputs = {"text": "What is your name?"} if task.startswith("T1") else {"audio": str(path)}
    session, chunks = run(tiny64, task, **inputs)
    assert session.done and session.rows is None  # rows returned to the pool
    assert 1 <= len(session.outputs) <= LIMIT["max_new_tokens"]
    text = "".join(c.text for c in chunks).strip()
    ids = [o[7] for o in session.outputs]
    ids = ids[: ids.index(EOT)] if EOT in ids else ids
    assert text == tiny64.tokenizer.decode(ids).strip()
    audio = np.concatenate([c.audio for c in chunks]) if chunks else np.zeros(0)
    if TASKS[task].speaks:
        n_frames = len(frames_of(session.outputs))
        assert audio.size == n_frames * 2048  # every frame decoded, tail included
        assert np.all(np.abs(audio) <= 1)
    else:
        assert audio.size == 0


def test_streamed_reply_equals_one_pass_decode_of_its_codes(tiny64, question_wav):
    session, chunks = run(tiny64, "A1A2+A1T2", audio=str(question_wav[0]), options={"max_new_tokens": 40, "lookahead": 3})
    streamed = np.concatenate([c.audio for c in chunks])
    frames = torch.tensor(frames_of(session.outputs))
    one_pass = tiny64.codec.decode(frames)
    assert streamed.shape == one_pass.shape
    np.testing.assert_allclose(streamed, one_pass, atol=1e-9)
    # the default (lookahead 2) is inaudibly close
    _, default_chunks = run(tiny64, "A1A2+A1T2", audio=str(question_wav[0]), options={"max_new_tokens": 40})
    assert snr_db(one_pass, np.concatenate([c.audio for c in default_chunks])) > 60
    # text arrives before its audio; audio comes as 1 frame first, then stride-4 chunks, then the tail
    assert chunks[0].text and chunks[0].audio.size == 0
    sizes = [c.audio.size // 2048 for c in chunks if c.audio.size]
    assert sizes[0] == 1 and set(sizes[1:-1]) == {4} and sum(sizes) == len(frames)


@pytest.mark.parametrize("lookahead", [0, 2, 3])
def test_first_audio_leaves_as_soon_as_the_delay_pattern_allows(tiny64, question_wav, lookahead):
    session, reply = tiny64.start_session("A1A2+A1T2", audio=str(question_wav[0]),
                                          options={"max_new_tokens": 30, "lookahead": lookahead})
    stream = tiny64._stream(reply)
    for chunk in stream:
        if chunk.audio.size:
            break
    # frame f is complete at output position f + 7; the first chunk needs frames 0..lookahead
    assert len(session.outputs) == 7 + 1 + lookahead and chunk.audio.size == 2048
    stream.close()  # a reader that leaves early frees the session's cache rows
    assert session.rows is None


def _streamed(codec, frames, **kw):
    streamer = AudioStreamer(codec, stride=4, seed=0, noise=True, **kw)
    chunks = []
    for frame in frames.tolist():
        streamer.push(frame)
        chunks += streamer.ready()
    chunks += streamer.finish()
    return chunks


def test_seam_quality_by_lookahead_and_the_reference_mode(tiny64):
    codec = tiny64.codec
    frames = torch.randint(0, 4096, (23, 7), generator=torch.Generator().manual_seed(3))
    one_pass = codec.decode(frames)
    snr = {}
    for lookahead in range(CONTEXT_FRAMES + 1):
        audio = np.concatenate(_streamed(codec, frames, lookahead=lookahead, mode="seamless"))
        assert audio.size == one_pass.size
        snr[lookahead] = snr_db(one_pass, audio)
    assert snr[3] == float("inf") or snr[3] > 200  # identical up to float64 rounding
    assert snr[0] < snr[1] < snr[2] < snr[3]
    reference = _streamed(codec, frames, lookahead=0, mode="reference")
    assert [c.size for c in reference] == [4 * 2048] * 5  # 23 frames: the last 3 never sent
    assert snr_db(one_pass[: 20 * 2048], np.concatenate(reference)) < snr[1]


def test_special_ids_in_a_frame_are_skipped_not_crashing(tiny64):
    codec = tiny64.codec
    frames = torch.randint(0, 4096, (8, 7), generator=torch.Generator().manual_seed(4)).tolist()
    frames[2][5] = PAD_A
    frames[6][0] = EOA
    audio = np.concatenate(_streamed(codec, torch.tensor(frames), lookahead=3, mode="seamless"))
    assert audio.size == 6 * 2048
    kept = torch.tensor([f for i, f in enumerate(frames) if i not in (2, 6)])
    np.testing.assert_allclose(audio, codec.decode(kept), atol=1e-9)


def test_noise_is_seeded_and_leaves_global_rng_alone(tiny64):
    frames = torch.randint(0, 4096, (4, 7), generator=torch.Generator().manual_seed(5))
    state = torch.random.get_rng_state()
    a, b = tiny64.codec.decode(frames, seed=1), tiny64.codec.decode(frames, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, tiny64.codec.decode(frames, seed=2))
    assert not np.allclose(a, tiny64.codec.decode(frames, seed=1, noise=False))


def test_kv_cached_decoding_equals_recomputing_the_whole_sequence(tiny64, question_wav):
    session, _ = run(tiny64, "A1A2", audio=str(question_wav[0]), options={"max_new_tokens": 12})
    gpt, T = tiny64.gpt, session.prompt_length
    # rebuild the full input sequence (prompt + fed-back steps) and run it in one causal pass
    fed = [[layershift(c, j) for j, c in enumerate(o[:7])] + [o[7]] for o in session.outputs[:-1]]
    tokens = torch.cat([session.prompt, torch.tensor(fed).T[None]], dim=-1)
    from zoo.mini_omni.gpt import KVCache

    cache = KVCache(gpt.config, 1, gpt.config.block_size, torch.float64, "cpu")
    with torch.inference_mode():
        x = gpt.embed(tokens, session.features)
        hidden = gpt(x, cache, torch.tensor([0]), torch.arange(tokens.size(-1))[None])
        greedy_text = gpt.text_logits(hidden[0, T - 1 :]).argmax(-1).tolist()
        greedy_audio = gpt.audio_logits(hidden[0, T - 1 :]).argmax(-1).tolist()
    assert greedy_text == [o[7] for o in session.outputs]
    assert greedy_audio == [o[:7] for o in session.outputs]


def test_sessions_batched_together_equal_each_run_alone(tiny64, question_wav):
    from zoo.mini_omni.engine import Engine

    model = tiny64
    alone = {}
    for name, kw in [("a", {"audio": str(question_wav[0])}), ("t", {"text": "Tell me a joke."})]:
        task = "A1A2+A1T2" if name == "a" else "T1A2"
        alone[name] = run(model, task, options={"max_new_tokens": 15}, **kw)[0].outputs
    engine = Engine(model.gpt, max_rows=4)
    s1, _ = model.start_session("A1A2+A1T2", audio=str(question_wav[0]), options={"max_new_tokens": 15})
    s2, _ = model.start_session("T1A2", text="Tell me a joke.", options={"max_new_tokens": 15})
    engine.start(s1)
    engine.step([s1])
    engine.step([s1])
    engine.start(s2)  # joins between steps, at a different position
    while not (s1.done and s2.done):
        engine.step([s1, s2])
    assert s1.outputs == alone["a"] and s2.outputs == alone["t"]
    assert sorted(engine.free_rows) == [0, 1, 2, 3]


def test_batch_trick_feeds_text_row_with_padding_and_forces_pad_after_eot(tiny64, question_wav):
    session, _ = run(tiny64, "A1A2+A1T2", audio=str(question_wav[0]), options={"max_new_tokens": 6})
    row0, row1 = session.next_input.tolist()
    last = session.outputs[-1]
    assert row0 == [layershift(c, j) for j, c in enumerate(last[:7])] + [last[7]]
    assert row1 == [layershift(PAD_A, j) for j in range(7)] + [last[7]]


def test_stop_rules_of_the_reference(tiny64):
    from zoo.mini_omni.engine import Engine

    engine = Engine(tiny64.gpt, max_rows=2)
    prompt = audio_question(TASKS["A1A2+A1T2"], 2)
    s = Session(TASKS["A1A2+A1T2"], prompt, None, tiny64.options(LIMIT), max_outputs=10)
    engine._record(s, [1] * 7, EOT, first=True)  # the prefill's _eot does not end the text
    engine._record(s, [2] * 7, 5, first=False)
    engine._record(s, [3] * 7, EOT, first=False)  # recorded, then text is over
    engine._record(s, [4] * 7, 77, first=False)  # forced to _pad_t
    assert [o[7] for o in s.outputs] == [EOT, 5, EOT, PAD_T] and not s.done
    engine._record(s, [5] * 6 + [EOA], 78, first=False)  # layer 6 _eoa: stop, not recorded
    assert s.done and len(s.outputs) == 4
    t = Session(TASKS["A1T2"], prompt[:1], None, tiny64.options(LIMIT), max_outputs=10)
    engine._record(t, None, 9, first=True)
    engine._record(t, None, EOT, first=False)  # text-only tasks end at _eot, not recorded
    assert t.done and [o[7] for o in t.outputs] == [9] and t.outputs[0][:7] == [PAD_A] * 7


def test_tied_embeddings_take_wte_like_the_reference(tmp_path):
    import yaml

    from zoo.mini_omni.model import load_gpt
    from zoo.mini_omni.random_weights import random_gpt_state, tiny_config

    config = tiny_config(tie_word_embeddings=True)
    state = random_gpt_state(config, torch.Generator().manual_seed(0))
    state["lm_head.weight"] = torch.randn_like(state["lm_head.weight"])  # a different stored copy
    torch.save(state, tmp_path / "lit_model.pth")
    (tmp_path / "model_config.yaml").write_text(yaml.safe_dump({**config.to_yaml_dict(), "unknown_key": 1}))
    gpt = load_gpt(tmp_path)
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    assert torch.equal(gpt.lm_head.weight, state["transformer.wte.weight"])
    (tmp_path / "model_config.yaml").write_text(yaml.safe_dump(config.to_yaml_dict() | {"tie_word_embeddings": False}))
    untied = load_gpt(tmp_path)
    assert torch.equal(untied.lm_head.weight, state["lm_head.weight"])


@pytest.mark.parametrize("rate, channels", [(8000, 1), (48000, 2), (16000, 2)])
def test_any_rate_and_channel_count_is_answered(tiny64, question_wav, rate, channels):
    import soxr

    _, audio, source_rate = question_wav
    resampled = soxr.resample(audio, source_rate, rate)
    if channels == 2:
        resampled = np.stack([resampled, resampled], axis=1)
    chunks = list(tiny64.respond(resampled, rate, {"max_new_tokens": 12}))
    assert sum(c.audio.size for c in chunks) > 0 and "".join(c.text for c in chunks)
    # same speech, same features length as the 16 kHz original
    assert tiny64.encode_audio(resampled, rate).shape == tiny64.encode_audio(audio, source_rate).shape


def test_silence_is_answered(tiny64):
    chunks = list(tiny64.respond(np.zeros(16000, np.float32), 16000, {"max_new_tokens": 10}))
    assert chunks


@pytest.mark.parametrize(
    "audio, rate, message",
    [
        (np.zeros(0, np.float32), 16000, "empty"),
        (np.full(16000, np.nan, np.float32), 16000, "NaN"),
        (np.zeros(16000 * 31, np.float32), 16000, "at most 30 s"),
        (b"RIFF....WAVEfmt garbage", None, "could not decode"),
    ],
)
def test_bad_audio_is_refused_before_any_generation(tiny64, audio, rate, message):
    from zoo.core.errors import AudioInputError

    with pytest.raises(AudioInputError, match=message):
        next(iter(tiny64.respond(audio, rate)))
    idle = tiny64._steppers._idle  # the refusal came before any stepper was taken
    assert idle is None or sorted(idle.engine.free_rows) == [0, 1]


def test_bad_options_and_tasks_are_refused(tiny64, question_wav):
    from zoo.core.errors import OptionsError

    with pytest.raises(OptionsError, match="top_p"):
        tiny64.respond(question_wav[0], options={"top_p": 2})
    with pytest.raises(OptionsError, match="unknown task"):
        tiny64.generate("A1A3", audio=str(question_wav[0]))
    with pytest.raises(OptionsError, match="non-empty text"):
        tiny64.respond_text("   ")


def test_text_deltas_join_to_the_full_decode_even_across_split_characters(tiny64):
    from zoo.mini_omni.model import TextStream

    text = " Héllo wörld, 你好 🎤 and the end."
    ids = tiny64.tokenizer.encode(text).ids
    assert len(ids) > len(text.split())  # multi-byte characters really are split over ids
    stream = TextStream(tiny64.tokenizer)
    deltas = [stream.push(i) for i in ids]
    assert "".join(deltas) == tiny64.tokenizer.decode(ids).lstrip() == text.lstrip()
    assert all("\ufffd" not in d for d in deltas)
