"""Mini-Omni beside its reference (gpt-omni/mini-omni): the reference's OmniInference and its own
``run_AT_batch_stream`` on our seeded random weights (its litgpt GPT, an openai-whisper encoder and
a SNAC holding ours), against ``respond``; the decode step is its ``next_token_batch`` and our
``Engine.step``; our sessions at real time from a batch sweep.

Precision: the reference runs in float32 only (its load_model builds the GPT in float32 and its
Whisper features are float32, which a bfloat16 GPT refuses), so ``--dtype bfloat16`` runs ours in
bfloat16 beside the reference as its users run it, and ``--dtype int8`` ours with int8 weight-only
transformer layers (zoo.mini_omni.gpt.precision); the rows are named with their precision."""
from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from comparison import Comparison, measure, median_ms, sessions_at_real_time
from latency import QUESTION

import zoo
from zoo.mini_omni.engine import Engine, Session
from zoo.mini_omni.gpt import precision
from zoo.mini_omni.prompts import TASKS, audio_question
from zoo.mini_omni.random_weights import (
    FULL_SNAC,
    FULL_WHISPER_DIMS,
    TINY_SNAC,
    TINY_WHISPER_DIMS,
    litgpt_yaml,
    random_snac,
    write_tiny_tokenizer,
)


def mini_omni_reference(ours, path: Path, size: str, device: torch.device, folder: Path):
    """The reference's OmniInference on our weights: its GPT (litgpt fork) with our LLM state, an
    openai-whisper model whose encoder holds our encoder's state, a SNAC built as ours is."""
    sys.path.insert(0, str(path))
    import lightning as L
    import whisper
    from litgpt.model import GPT, Config

    inference = importlib.import_module("inference")
    config = Config(**{**litgpt_yaml(ours.gpt.config), "post_adapter": False})
    gpt = GPT(config)
    gpt.load_state_dict(ours.gpt.state_dict(), strict=True)  # float32 whatever ours runs in (see the module's doc)
    dims = whisper.model.ModelDimensions(**(FULL_WHISPER_DIMS if size == "full" else TINY_WHISPER_DIMS))
    whisper_model = whisper.model.Whisper(dims)
    whisper_model.encoder.load_state_dict(ours.encoder.state_dict(), strict=True)
    write_tiny_tokenizer(folder / "tokenizer.json")  # decodes the text at the end; not timed
    runner = object.__new__(inference.OmniInference)
    runner.device = str(device)
    runner.fabric = L.Fabric(devices=1, accelerator=device.type, strategy="auto")
    runner.model = runner.fabric.setup(gpt).eval()  # as its load_model: the wrapper has .device
    runner.whispermodel = whisper_model.to(device).eval()
    runner.snacmodel = random_snac(FULL_SNAC if size == "full" else TINY_SNAC, 0).to(device).eval()
    runner.text_tokenizer = importlib.import_module("litgpt").Tokenizer(folder)
    return inference, runner


def compare_mini_omni(args, device: torch.device) -> list[dict]:
    ours = zoo.load("mini-omni", random_weights=args.size, device=str(device), dtype=args.dtype)
    rate = ours.card.output_sample_rate
    steps = args.steps
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "question.wav"
        audio, sr = sf.read(QUESTION, dtype="float32")
        sf.write(wav, audio, sr)
        # the reference holds float32 weights: a quantised run gives it the float32 draw of the same
        # seed, the values ours were packed from
        source = ours if precision(args.dtype)[1] is None else zoo.load(
            "mini-omni", random_weights=args.size, device=str(device), dtype="float32")
        inference, runner = mini_omni_reference(source, args.reference, args.size, device, Path(tmp))
        for name, run in (("reference (float32)", lambda: _reference_reply(runner, wav, steps)),
                          (f"omni-zoo ({args.dtype})", lambda: _our_reply(ours, wav, steps))):
            owner, method = (inference, "next_token_batch") if name.startswith("reference") else (Engine, "step")
            rows.append(measure(name, run, owner, method, rate, device, args))
    if source is not ours:
        rows[1]["agreement_with_float32"] = token_agreement(ours, source, args.steps)
    step_budget = 1000 / ours.card.reply_tokens_per_second
    rows[0]["sessions_at_real_time"] = int(rows[0]["step_ms_p50"] <= step_budget)  # one session at a time
    rows[1]["sessions_at_real_time"], rows[1]["batch_sweep"] = sessions_at_real_time(
        args.sessions, lambda batch: _our_step_ms(ours, batch, args, device), step_budget)
    return rows


def token_agreement(quantised, float32, steps: int) -> dict:
    """The quality cost of quantisation: ``quantised`` teacher-forced along the float32 twin's
    greedy reply to the demo question (the same Whisper features), step by step: whether its own
    greedy choice of each of the 8 streams (7 codebooks and the text) is the twin's."""
    task = TASKS["A1A2+A1T2"]
    features = float32.encode_audio(str(QUESTION))
    runs = []
    for model in (float32, quantised):
        dtype = model.gpt.transformer.wte.weight.dtype
        session = Session(task, audio_question(task, features.size(1)), features.to(dtype),
                          model.options({"temperature": 0}), max_outputs=steps)
        engine = Engine(model.gpt, max_rows=2)
        engine.start(session)
        runs.append((engine, session))
    (twin_engine, twin), (engine, session) = runs
    inputs = [twin.next_input]
    while not twin.done:
        twin_engine.step([twin])
        inputs.append(twin.next_input)
    for forced in inputs[: len(twin.outputs) - 1]:
        if session.done:
            break
        session.next_input = forced
        engine.step([session])
    pairs = list(zip(twin.outputs, session.outputs))
    same = [sum(a == b for a, b in zip(ours, theirs)) for theirs, ours in pairs]
    return {"positions": len(twin.outputs), "compared": len(pairs),
            "tokens_agreeing": round(sum(same) / (8 * len(pairs)), 4),
            "positions_all_agreeing": round(sum(n == 8 for n in same) / len(pairs), 4),
            "first_disagreement": next((i for i, n in enumerate(same) if n < 8), None)}


def _reference_reply(runner, wav: Path, steps: int):
    T = 3 + int((sf.info(wav).frames / sf.info(wav).samplerate) * 1000 / 20) + 1  # its prompt length
    for pcm in runner.run_AT_batch_stream(str(wav), max_returned_tokens=T + steps, temperature=0.9, top_k=1):
        yield np.frombuffer(pcm, np.int16)  # its chunks are PCM16 bytes


def _our_reply(ours, wav: Path, steps: int):
    for chunk in ours.respond(str(wav), options={"max_new_tokens": steps, "top_k": 1}):
        yield chunk.audio


def _our_step_ms(ours, batch: int, args, device: torch.device) -> float:
    """The median decode step of ``batch`` sessions on the same question, started together."""
    features = ours.encode_audio(str(QUESTION))
    task = TASKS["A1A2+A1T2"]
    opts = ours.options({"max_new_tokens": 1 << 10, "top_k": 1})
    engine = Engine(ours.gpt, max_rows=2 * batch)
    live = [Session(task, audio_question(task, features.size(1)), features, opts, max_outputs=1 << 10)
            for _ in range(batch)]
    engine.start_many(live)
    return median_ms(lambda: engine.step(live), args.sweep_steps, device)


COMPARISON = Comparison(markers=("inference.py",), dependencies=("lightning", "whisper", "snac", "yaml"),
                        install="install its requirements.txt (e.g. pip install lightning openai-whisper snac) "
                                "in this environment", run=compare_mini_omni, dtypes=("float32", "bfloat16", "int8"))
