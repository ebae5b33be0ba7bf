"""What the pages share, without a browser: the client's model list and its failures (refusals,
replies cut short with or without the server's reason: never a finished-looking reply), and the
per-turn helpers (reply text from the card, the turn's numbers, the waveform picture)."""
import base64
import io
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from voice_stub import ABORT_REASON, ABORTED, BUSY, CUT, GONE, MODELS, SEEING, VoiceStub

from webui.client import BackendError, ReplyBrokeOff, ServerBackend
from webui.turns import AUDIO_ONLY, NO_TEXT, WAITING, error_text, reply_text, turn_stats, waveform_png


def silence_wav(seconds=0.2, rate=16000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(bytes(2 * int(seconds * rate)))
    return out.getvalue()


@pytest.fixture(scope="module")
def stub():
    with VoiceStub() as stub:
        yield stub


def test_models_lists_every_model_with_its_card_facts(stub):
    models = ServerBackend(stub.url).models()
    assert [m.model for m in models] == [m["id"] for m in MODELS]
    aborted = models[1]
    assert aborted.text_output is False and aborted.output_sample_rate == 16000
    assert "speech only" in aborted.facts() and "16 kHz out" in aborted.facts()
    assert ServerBackend(stub.url).info().model == BUSY  # the default is the first
    seeing = next(m for m in models if m.model == SEEING)
    assert seeing.image_input and "takes an image" in seeing.facts()
    assert not any(m.image_input for m in models if m.model != SEEING) and "image" not in aborted.facts()


def test_an_image_goes_with_the_question_in_the_chat_body(stub):
    """The image field of /chat (as the Mini-Omni2 clients send it): base64 of the file's bytes."""
    picture = (Path(__file__).resolve().parents[1] / "demos" / "images" / "red_circle.png").read_bytes()
    with pytest.raises(ReplyBrokeOff):  # the stub cuts the reply; the body is what counts here
        list(ServerBackend(stub.url).stream(silence_wav(), model=SEEING, image=picture))
    body = stub.requests[-1]
    assert body["model"] == SEEING and base64.b64decode(body["image"]) == picture
    with pytest.raises(ReplyBrokeOff):
        list(ServerBackend(stub.url).stream(silence_wav(), model=SEEING))
    assert "image" not in stub.requests[-1]  # no image: no field


@pytest.mark.parametrize("model, status", [(BUSY, 503), (GONE, 404)])
def test_refusals_say_the_status_and_the_servers_message(stub, model, status):
    with pytest.raises(BackendError, match=f"HTTP {status}") as caught:
        list(ServerBackend(stub.url).stream(silence_wav(), model=model))
    assert not isinstance(caught.value, ReplyBrokeOff)
    assert stub.requests[-1]["model"] == model  # the chosen model travels with the request


def test_an_aborted_reply_raises_with_the_servers_reason_after_what_arrived(stub):
    got = []
    with pytest.raises(ReplyBrokeOff, match=ABORT_REASON):
        for chunk in ServerBackend(stub.url).stream(silence_wav(), {"max_new_tokens": 9}, model=ABORTED):
            got.append(chunk)
    assert sum(c.audio.size for c in got) == 4000 and stub.requests[-1]["max_new_tokens"] == 9


def test_a_reply_cut_without_a_reason_is_broken_off_not_finished(stub):
    with pytest.raises(ReplyBrokeOff, match="broke off before it finished"):
        list(ServerBackend(stub.url).stream(silence_wav(), model=CUT))


def test_reply_text_reads_the_card_not_the_model():
    assert reply_text("", text_output=False) == AUDIO_ONLY
    assert reply_text("", text_output=False, finished=True) == AUDIO_ONLY
    assert reply_text("", text_output=True) == WAITING
    assert reply_text(" ", text_output=True, finished=True) == NO_TEXT
    assert reply_text(" hi there ", text_output=True) == "hi there"


def test_turn_stats_and_error_text():
    assert turn_stats(812.4, 36000, 24000) == "first audio after 812 ms · 1.5 s of audio"
    assert turn_stats(None, 0, 24000) == "no audio · 0.0 s of audio"
    assert error_text("HTTP 503:\n  busy") == "⚠ reply failed: HTTP 503: busy"


def test_waveform_png_draws_the_envelope():
    rate = 24000
    t = np.arange(rate) / rate
    loud_then_quiet = np.where(t < 0.5, 0.9, 0.05) * np.sin(2 * np.pi * 220 * t)
    image = Image.open(io.BytesIO(waveform_png(loud_then_quiet.astype(np.float32), 200, 60))).convert("RGB")
    assert image.size == (200, 60)
    pixels = np.asarray(image).astype(int)
    drawn = (np.abs(pixels - [234, 88, 12]).sum(axis=2) < 30)  # the waveform's colour
    heights = drawn.sum(axis=0)
    assert heights[:90].mean() > 40 and heights[110:].mean() < 10  # tall while loud, flat while quiet
    assert waveform_png(np.zeros(0, np.float32))  # an empty reply still gives a picture


def test_the_in_process_backend_asks_with_the_image_as_the_model_would_be_asked():
    """The Gradio page in-process (LocalBackend): the image goes to the model's respond, the same
    reply as respond(image=...) gives; the card is the page's (image_input)."""
    import zoo
    from webui.client import LocalBackend

    model = zoo.load("mini-omni2", random_weights="tiny", device="cpu")
    backend = LocalBackend(model)
    assert backend.info().image_input and "takes an image" in backend.info().facts()
    picture = (Path(__file__).resolve().parents[1] / "demos" / "images" / "red_circle.png").read_bytes()
    question, options = silence_wav(0.5), {"max_new_tokens": 12}
    with_image = "".join(c.text for c in backend.stream(question, options, image=picture))
    assert with_image == "".join(c.text for c in model.respond(question, options=options, image=picture))
    without = "".join(c.text for c in backend.stream(question, options))
    assert without == "".join(c.text for c in model.respond(question, options=options))
