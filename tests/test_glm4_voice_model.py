"""GLM-4-Voice through the zoo interface on the tiny checkpoints (random weights: noise):
streaming, the interleave schedule, stop rules, multi-turn history, batched serving."""
import numpy as np
import pytest
import torch

import zoo
from zoo.core.errors import OptionsError, WeightsNotFound
from zoo.glm4_voice.model import GlmVoice, conversation_text
from zoo.glm4_voice.prompt import LOW_LATENCY_BLOCKS, SYSTEM_PROMPT_AUDIO


@pytest.fixture(scope="module")
def model():
    return zoo.load("glm-4-voice", random_weights="tiny", device="cpu")


@pytest.fixture(scope="module")
def question():
    return 0.1 * np.sin(np.arange(16000 * 2) / 16000 * 2 * np.pi * 220).astype(np.float32), 16000


def collect(chunks):
    chunks = list(chunks)
    audio = np.concatenate([c.audio for c in chunks]) if chunks else np.zeros(0, np.float32)
    return chunks, audio, "".join(c.text for c in chunks)


def test_card_and_registry():
    card = zoo.card("glm-4-voice")
    assert "glm-4-voice" in zoo.names()
    assert card.output_sample_rate == 22050 and card.input_sample_rate == 16000
    assert card.multi_turn and card.text_input and not card.duplex
    assert set(card.components) == {"llm", "tokenizer", "decoder"}


def test_respond_streams_text_and_audio(model, question):
    chunks, audio, text = collect(model.respond(*question, {"max_new_tokens": 80, "temperature": 0}))
    assert len([c for c in chunks if c.audio.size]) >= 2  # several blocks, not one at the end
    assert text and audio.dtype == np.float32 and np.abs(audio).max() <= 1.0
    turn = chunks[-1].turn
    assert turn["spoken"] and turn["user"].startswith("<|begin_of_audio|>") and turn["assistant"]
    assert all(c.turn is None for c in chunks[:-1])
    audio_ids = turn["assistant"].count("<|audio_")
    assert audio.size == model.decoder.num_samples(audio_ids)  # nothing lost at block seams or at the end


def test_seeded_replies_are_reproducible_and_the_global_rng_is_untouched(model, question):
    state = torch.get_rng_state()
    first = collect(model.respond(*question, {"max_new_tokens": 40, "seed": 3}))
    second = collect(model.respond(*question, {"max_new_tokens": 40, "seed": 3}))
    other = collect(model.respond(*question, {"max_new_tokens": 40, "seed": 4}))
    assert torch.equal(state, torch.get_rng_state())
    assert first[2] == second[2] and np.array_equal(first[1], second[1])
    assert first[0][-1].turn != other[0][-1].turn


def test_streamed_audio_is_the_decoders_stream_of_the_reply_blocks(model, question, monkeypatch):
    """The reply hands the decoder its audio ids in the schedule's blocks (10, 25, 50, ...; the rest
    at the end), and its audio is exactly that stream's output: as long as a one-pass decode."""
    calls = []

    def recording(kind, method):  # the reply streams through zoo.core.streaming: step, then finish
        return lambda state, ids, **rows: calls.append((kind, list(ids))) or method(state, ids, **rows)

    monkeypatch.setattr(model.decoder, "step", recording("push", model.decoder.step))
    monkeypatch.setattr(model.decoder, "finish", recording("finish", model.decoder.finish))
    chunks, audio, _ = collect(model.respond(*question, {"max_new_tokens": 120, "temperature": 0}))
    monkeypatch.undo()
    ids = [int(t.split("|>")[0]) for t in chunks[-1].turn["assistant"].split("<|audio_")[1:]]
    assert [kind for kind, _ in calls] == ["push"] * (len(calls) - 1) + ["finish"]
    assert sum((block for _, block in calls), []) == ids
    pushed = [len(block) for kind, block in calls if kind == "push"]
    assert pushed == list(LOW_LATENCY_BLOCKS[: len(pushed)]) and len(calls[-1][1]) <= LOW_LATENCY_BLOCKS[len(pushed)]
    replay = model.decoder.new_state("seamless")
    expected = [getattr(replay, kind)(block) for kind, block in calls]
    np.testing.assert_allclose(audio, np.concatenate(expected), atol=1e-6)
    assert audio.size == model.decoder.one_pass(ids).size


def test_history_continues_the_conversation(model, question):
    first = collect(model.respond(*question, {"max_new_tokens": 20, "temperature": 0}))[0][-1].turn
    history_text = conversation_text([first])
    assert history_text.count(SYSTEM_PROMPT_AUDIO) == 1 and history_text.endswith(first["assistant"])
    reply = model.prepare(text="and then?", history=[first])
    assert reply.prompt.startswith(history_text.strip()) and reply.prompt.count("<|system|>") == 1
    second = collect(model.respond_text("and then?", {"max_new_tokens": 20, "temperature": 0}, history=[first]))
    assert second[0][-1].turn["spoken"] is False
    with pytest.raises(OptionsError, match="history\\[0\\]"):
        model.prepare(text="x", history=[{"user": "no assistant"}])


def test_interleave_schedule_and_stop(model, question):
    """Drive a reply with chosen ids: 13 text then 26 audio ids, repeated, then <|user|>. Audio
    comes out in blocks of 10, 25, 50, ... (seamless) and the rest at the stop."""
    tok = model.tokenizer
    text_id, audio_id, end = tok.encode("hello", prefix=False)[0], tok.audio_offset + 7, tok.id("<|user|>")
    plan = ([text_id] * 13 + [audio_id] * 26) * 3 + [end, text_id]
    reply = model.prepare(text="hi", options={"max_new_tokens": 500})
    vocab = model.llm.config.vocab_size
    audio_seen, blocks_at, texts, total = 0, [], [], 0
    for token in plan:
        logits = torch.full((1, vocab), -1e9)
        logits[0, token] = 0
        reply.choose(logits)
        audio_seen += token == audio_id
        chunk = reply.poll()
        if chunk and chunk.audio.size:
            blocks_at.append(audio_seen)
            total += chunk.audio.size
        texts.append(chunk.text if chunk else "")
        if reply.done:
            break
    assert reply.done and reply.generated == len(plan) - 1  # nothing after <|user|>
    assert blocks_at == [10, 35, 78]  # after 10 and 25 more audio ids; the last 43 at the stop
    assert total == model.decoder.num_samples(78)
    assert "".join(texts) == tok.decode([text_id]) * 39


def test_token_limit_flushes_the_last_block(model, question):
    chunks, audio, _ = collect(model.respond(*question, {"max_new_tokens": 7, "temperature": 0}))
    turn = chunks[-1].turn
    assert turn is not None
    assert audio.size == model.decoder.num_samples(turn["assistant"].count("<|audio_"))


def test_batched_serving_equals_replies_run_alone(model, question):
    options = [{"max_new_tokens": 30, "temperature": 0}, {"max_new_tokens": 45, "seed": 1}]
    alone = [collect(model.respond(*question, o)) for o in options]
    stepper = model.stepper(max_sessions=3)
    jobs = [stepper.prepare(question[0], question[1], o) for o in options]
    outputs = [[] for _ in jobs]
    stepper.start(jobs[0])
    stepper.step(jobs[:1])  # the second joins a step later, at a different length
    stepper.start(jobs[1])
    while not all(j.done for j in jobs):
        stepper.step(jobs)
        for out, job in zip(outputs, jobs):
            chunk = job.poll()
            if chunk:
                out.append(chunk)
    for job in jobs:
        stepper.release(job)
    for (chunks, audio, text), out in zip(alone, outputs):
        assert "".join(c.text for c in out) == text
        assert out[-1].turn == chunks[-1].turn
        np.testing.assert_allclose(np.concatenate([c.audio for c in out]), audio, atol=1e-5)


def test_bad_input_and_options_are_clear_errors(model):
    with pytest.raises(OptionsError, match="stream_mode"):
        model.options({"stream_mode": "fast"})
    with pytest.raises(OptionsError, match="audio or a non-empty text"):
        model.prepare(text="   ")


def test_missing_weights_name_the_component(tmp_path):
    with pytest.raises(WeightsNotFound, match="llm"):
        GlmVoice.load(device="cpu", llm=tmp_path, tokenizer=tmp_path, decoder=tmp_path)


def test_end_to_end_equals_the_reference_code(model):
    """tests/data/glm_e2e_reference.json: the reference pipeline (speech tokenizer, web demo prompt,
    remote ChatGLM greedy generate, web demo streaming loop over token2wav) on these tiny folders,
    float32. Ours in stream_mode="reference": the same speech ids, prompt ids, generated ids, text and
    first audio block. (The reference runs its flow in training mode, dropout on, because it never
    calls .eval(); the fixture was made with .eval() patched in.)"""
    import json
    from pathlib import Path

    reference = json.loads((Path(__file__).parent / "data" / "glm_e2e_reference.json").read_text())
    options = {"temperature": 0, "max_new_tokens": 40, "stream_mode": "reference"}
    reply = model.prepare(audio=str(Path(__file__).parents[1] / "demos/samples/02.wav"), options=options)
    assert reply.turn["user"].count("<|audio_") == len(reference["speech_ids"])
    assert len(reply.prompt_ids) == reference["input_ids_len"]
    stepper = model.stepper(1)
    stepper.start(reply)
    chunks = []
    while not reply.done:
        stepper.step([reply])
        chunk = reply.poll()
        if chunk is not None:
            chunks.append(chunk)
    stepper.release(reply)
    assert reply.splitter.completion_ids == reference["generated"][:40]
    assert reference["text"].startswith("".join(c.text for c in chunks))
    first_block = next(c.audio for c in chunks if c.audio.size)
    assert first_block.size == reference["block0_samples"]
    np.testing.assert_allclose(first_block[::64], reference["block0_every_64th"], atol=2e-4)
