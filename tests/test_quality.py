"""bench/quality (issue #18): the scores, the ASR, DNSMOS, the duplex latency detector, and one
end-to-end run of ``python -m bench.quality`` on tiny weights whose numbers are checked against
the models' real output."""
import json

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO

from bench.quality import data, duplex, scoring
from bench.quality.asr import AsrUnavailable, load_asr

QUALITY = REPO / "demos" / "quality"
# pocketsphinx on the bundled espeak-ng sentence "How many days are there in a week?" (q05.wav):
# 0.0 with pocketsphinx 5.1.1; the bound leaves room for one wrong word in 8 from another release
KNOWN_SENTENCE_WER_BOUND = 0.25

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def asr():
    return load_asr("pocketsphinx")


def test_scores_follow_their_documented_rules():
    assert scoring.normalize("Seven days, 7 DAYS!") == "seven days seven days"
    assert scoring.wer("the weather is nice today", "the weather is nice") == pytest.approx(0.2)
    assert scoring.wer("the cat", "") == 1.0 and scoring.wer("", "anything") is None
    assert scoring.answer_score("keyword", "It is Paris, of course.", "Paris")["value"] == 1.0
    assert scoring.answer_score("keyword", "Parisian food", "Paris")["value"] == 0.0  # whole words only
    choices = {"A": "a chair", "B": "an apple", "C": "a car"}
    for said, picked in [("B.", "B"), ("The answer is b", "B"), ("I'd say an apple", "B"), ("option a", "A"),
                         ("a chair or an apple", None), ("a cat", None), ("", None)]:
        assert scoring.mcq_choice(said, choices) == picked, said
    assert scoring.answer_score("mcq", "an apple", "B", choices)["value"] == 1.0
    assert scoring.answer_score("mcq", "a car", "B", choices)["value"] == 0.0
    assert scoring.answer_score("repeat", "the weather is nice today", "the weather is nice today")["value"] == 0.0
    assert scoring.answer_score("open", "whatever", None)["value"] is None


def test_questions_load_from_jsonl_or_a_transcripts_folder(tmp_path):
    bundled = data.load_questions()
    assert [q["task"] for q in bundled] == ["open", "keyword", "mcq", "repeat", "keyword"]
    assert all(sf.info(q["audio"]).samplerate == 16000 for q in bundled)
    samples = data.load_questions(REPO / "demos" / "samples")
    assert len(samples) == 5 and samples[0]["prompt"] == "What is your name?"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"audio": "x.wav", "task": "essay", "reference": "y"}) + "\n")
    with pytest.raises(ValueError, match="essay"):
        data.load_questions(bad)


def test_asr_really_transcribes_a_known_sentence(asr):
    audio, rate = sf.read(QUALITY / "q05.wav", dtype="float32")
    heard = asr.transcribe(audio, rate)
    assert scoring.wer("How many days are there in a week?", heard) <= KNOWN_SENTENCE_WER_BOUND, heard
    # the same length of noise is not heard as that sentence: the transcript comes from the audio
    noise = (0.1 * np.random.default_rng(0).standard_normal(audio.size)).astype(np.float32)
    assert scoring.wer("How many days are there in a week?", asr.transcribe(noise, rate)) >= 0.75


def test_whisper_is_used_only_from_local_weights(tmp_path):
    with pytest.raises(AsrUnavailable, match="no local Whisper"):
        load_asr("whisper", whisper_source=str(tmp_path / "not-here"))


def test_dnsmos_rates_clean_speech_above_noise():
    from bench.quality.mos import Mos

    mos = Mos()
    assert mos.available, mos.reason
    speech, rate = sf.read(QUALITY / "q05.wav", dtype="float32")
    noise = (0.3 * np.random.default_rng(0).standard_normal(speech.size)).astype(np.float32)
    clean, noisy = mos.score(speech, rate), mos.score(noise, rate)
    assert 1.0 <= noisy["ovrl"] < clean["ovrl"] <= 5.0, (clean, noisy)


RATE = 16000


def tone(segments, seconds=5.0, amplitude=0.3):
    """Model output: a 200 Hz tone during each (start, end) segment, silence elsewhere."""
    t = np.arange(int(seconds * RATE)) / RATE
    on = np.zeros(t.size, bool)
    for start, end in segments:
        on |= (t >= start) & (t < end)
    return (amplitude * np.sin(2 * np.pi * 200 * t) * on).astype(np.float32)


def test_duplex_latencies_on_signals_with_known_answers():
    # the user stops at 1.0 s, the model starts at 1.3 s; the user barges in at 2.0 s and the
    # model stops at 3.0 s; a 0.1 s gap at 2.5 s is a pause between words, not a stop
    out = duplex.latencies(tone([(1.3, 2.5), (2.6, 3.0)]), RATE, user_end_s=1.0, barge_s=2.0)
    assert out["start_latency_s"] == pytest.approx(0.3) and not out["overlap_at_end"]
    assert out["barge_in_latency_s"] == pytest.approx(1.0) and out["barge_in_note"] is None
    # already talking when the user stops: start latency 0, flagged as overlap
    out = duplex.latencies(tone([(0.5, 2.4)]), RATE, user_end_s=1.0, barge_s=2.0)
    assert out["start_latency_s"] == 0.0 and out["overlap_at_end"]
    assert out["barge_in_latency_s"] == pytest.approx(0.4)
    # silent when the user barges in; talking to the end of the script: no barge-in number
    out = duplex.latencies(tone([(1.2, 1.6)]), RATE, user_end_s=1.0, barge_s=2.0)
    assert out["barge_in_latency_s"] is None and "not speaking" in out["barge_in_note"]
    out = duplex.latencies(tone([(1.5, 5.0)]), RATE, user_end_s=1.0, barge_s=2.0)
    assert out["barge_in_latency_s"] is None and "did not stop" in out["barge_in_note"]
    # never answers before the user speaks again, and quieter than the gate: no start either
    out = duplex.latencies(tone([(1.3, 3.0)], amplitude=0.005), RATE, user_end_s=1.0, barge_s=2.0)
    assert out["start_latency_s"] is None and out["start_note"] and out["model_active_fraction"] == 0.0


def test_one_command_scores_two_tiny_models_end_to_end(tmp_path, asr):
    """mini-omni and hertz-dev (tiny, random): every number in the report comes from the reply
    audio and text the models really produced."""
    import zoo
    from bench.quality.runner import main

    out = tmp_path / "report"
    assert main(["--model", "mini-omni", "hertz-dev", "--tiny", "--limit", "1", "--max-new-tokens", "16",
                 "--asr", "pocketsphinx", "--duplex-script", "0.5,0.75,0.5,0.5", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "quality.png").stat().st_size > 10_000
    markdown = (out / "report.md").read_text()
    assert markdown.count("RANDOM WEIGHTS") == 2 and "pocketsphinx" in markdown
    assert report["asr"].startswith("pocketsphinx") and report["mos"].startswith("DNSMOS")
    assert report["asr_check"]["questions"][0]["said"] == "Can you tell me a joke?"

    mini, hertz = report["models"]
    for m in (mini, hertz):
        (row,) = m["questions"]
        audio, rate = sf.read(row["reply_wav"], dtype="float32")
        assert rate == zoo.card(m["model"]).output_sample_rate and audio.size / rate == pytest.approx(row["audio_s"])
        assert audio.size / rate >= 0.5 and np.abs(audio).max() > 0.01  # a real reply, long enough for DNSMOS
        assert asr.transcribe(audio, rate) == row["transcript"]  # the ASR's transcript of that very audio
        assert 1.0 <= row["mos"]["ovrl"] <= 5.0 and row["ttfa_ms"] > 0 and row["rtf"] > 0
        assert m["summary"]["ttfa_ms_median"] == row["ttfa_ms"]
    row = mini["questions"][0]
    assert row["text"] and row["consistency_wer"] == scoring.wer(row["text"], row["transcript"])
    assert hertz["questions"][0]["consistency_wer"] is None and hertz["questions"][0]["answer_source"] == "transcript"

    # the saved reply is what respond() gives for that question with the same options
    model = zoo.load("mini-omni", random_weights="tiny")
    again = np.concatenate([c.audio for c in model.respond(str(QUALITY / "q01.wav"),
                                                           options={"max_new_tokens": 16, "seed": 0})])
    np.testing.assert_array_equal(again, sf.read(row["reply_wav"], dtype="float32")[0])

    d = hertz["duplex"]
    assert d["frames"] == 18 and d["barge_in_at_s"] == pytest.approx(1.25)
    stereo, rate = sf.read(d["wav"], dtype="float32")
    assert stereo.shape == (18 * 2000, 2) and rate == 16000
    assert d == {**d, **duplex.latencies(stereo[:, 1], rate, d["user_end_s"], d["barge_in_at_s"])}
    assert "duplex" not in mini  # half-duplex models have no scripted conversation


def tiny_whisper(folder):
    """A random Whisper with a byte-level vocabulary, saved as a checkpoint folder: what it hears
    is nonsense, but it runs through transformers' pipeline as a real checkpoint would."""
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizer,
    )

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]  # GPT-2's byte alphabet
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
                "<|notimestamps|>"]
    vocab = {token: i for i, token in enumerate(chars + specials)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    end = vocab["<|endoftext|>"]
    tokenizer = WhisperTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token=specials[0],
                                 bos_token=specials[0], eos_token=specials[0], pad_token=specials[0])
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.save_pretrained(folder)
    config = WhisperConfig(vocab_size=len(vocab), d_model=32, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, max_target_positions=64, pad_token_id=end, bos_token_id=end,
                           eos_token_id=end, decoder_start_token_id=vocab["<|startoftranscript|>"])
    WhisperForConditionalGeneration(config).save_pretrained(folder)
    GenerationConfig(decoder_start_token_id=config.decoder_start_token_id, eos_token_id=end, pad_token_id=end,
                     max_length=12, is_multilingual=True, lang_to_id={"<|en|>": vocab["<|en|>"]},
                     task_to_id={"transcribe": vocab["<|transcribe|>"], "translate": vocab["<|translate|>"]},
                     no_timestamps_token_id=vocab["<|notimestamps|>"]).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


def test_whisper_runs_from_a_local_folder_when_there_is_one(tmp_path):
    asr = load_asr("auto", whisper_source=str(tiny_whisper(tmp_path)), device="cpu")
    assert asr.name.startswith("whisper (") and str(tmp_path) in asr.name
    audio, rate = sf.read(QUALITY / "q05.wav", dtype="float32")
    assert isinstance(asr.transcribe(audio, rate), str)  # random weights: the words are nonsense
