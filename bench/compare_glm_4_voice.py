"""GLM-4-Voice beside its reference (THUDM/GLM-4-Voice): model_server.py's generate loop on the
glm-4-voice-9b remote code, and web_demo.py's block loop on flow_inference.AudioDecoder, against our
engine and decoder, on our seeded random weights and the same prompt ids (the question's audio
tokens from our speech tokenizer, in the reference's prompt), greedy on both sides.

``--reference``: a THUDM/GLM-4-Voice checkout (eb00ce9) with its Matcha-TTS submodule in
third_party/, and the checkpoint's remote code (``modeling_chatglm.py``, ``configuration_chatglm.py``;
at the root of the hub repo THUDM/glm-4-voice-9b, under ``model/`` of its public copy
WenzheLiu-Speech/GLM-4-Voice-SFT@0fc6ca4) in ``glm-4-voice-9b/`` inside it. Their Python
dependencies are installed beside, not into, this environment (bench/gpu.sh says how).

What was written for older libraries runs with what they removed put back, on the reference's
objects only, as a public benchmark of the remote code does: ``config.max_length`` (transformers
4.x's generation default, 20), ``_extract_past_from_model_output``, the attention implementation
the reference server's ``from_pretrained`` picks (SDPA). flow_inference.py imports torchaudio and
never calls it on this path; torchaudio has no build for this torch, so an empty module stands in.
The web demo never puts the decoder's networks in eval mode, so for its users the flow encoder's
dropout (0.1 in the published config.yaml) is on; here they are in eval mode, as our decoder (and
the parity fixtures) compute, so the two sides' audio compares (dropout's own time is negligible).

The reference LLM runs model_server.py's ``generate`` through the model's own generation hooks
(``prepare_inputs_for_generation``, ``forward``, ``_update_model_kwargs_for_generation``; greedy
takes the arg max, as generate does without sampling); ours is ``SlotEngine`` (prefill, then
batched steps with CUDA graphs on a GPU). Both generate ``--steps`` tokens (no stop: equal work).
Which tokens are audio follows the interleave the model is trained on (13 text tokens, then 26
audio tokens), so the timings do not depend on what random weights pick; the audio codes are one
seeded draw, the same for both. Blocks are the web demo's sizes (25, 50, 100, 150, 200, ...), each
decoded as soon as its last token is out (the web demo waits for the next token: one step more),
the rest at the end with ``finalize``. The reference decodes with web_demo.py's token2wav calls;
ours with our decoder's "reference" stream mode, the same computation (its parity tests), so both
sides' audio is compared sample by sample; our seamless mode's first block is 10 tokens, 15 steps
sooner.

TTFA: the prompt ids in hand -> the first block's audio (the speech tokenizer, the same on both
sides, is left out). RTF: the time after that over the audio after it. The step: one decode
forward (the reference's ``forward`` after its prefill; our ``SlotEngine.step``); sessions at real
time need 18.75 tokens/s each (53.3 ms a step). Each row also says for how many tokens, from the
first, both sides picked the same id (``agreeing_tokens`` of ``generated_tokens``), the share of
the reference's ids our network picks along the reference's reply (``teacher_forced_agreement``:
transformers' forward of the layers our engine runs) and the largest difference between the two
sides' audio (``audio_max_difference``).

Memory: the reference holds our LLM's tensors (shared), except its joined query_key_value weights,
and its own decoder; its caches are freed before ours are measured.
"""
from __future__ import annotations

import gc
import importlib
import importlib.machinery
import importlib.util
import sys
import tempfile
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch
from comparison import Comparison, agreeing_prefix, measure, median_ms, sessions_at_real_time
from latency import QUESTION

import zoo
from zoo.glm4_voice.decoder_config import DecoderConfig
from zoo.glm4_voice.engine import SlotEngine
from zoo.glm4_voice.llm import published_state
from zoo.glm4_voice.prompt import REFERENCE_BLOCKS
from zoo.glm4_voice.random_weights import FULL_LLM_CONFIG, TINY_DECODER, TINY_LLM_CONFIG, write_tiny_decoder

TEXT_RUN, AUDIO_RUN = 13, 26  # the interleave the model is trained on (its system prompt says so)
TOKENS_PER_SECOND = 12.5 * (TEXT_RUN + AUDIO_RUN) / AUDIO_RUN  # 18.75 for real time while interleaving
LLM_CODE = "glm-4-voice-9b"  # the checkpoint's remote code, inside the checkout
REFERENCE_PACKAGE = "glm_4_voice_reference"


def block_schedule(count: int, codes: list[int]) -> tuple[list[list[int] | None], list[int]]:
    """For generated token 0..count-1 under the trained interleave: the block of audio codes it
    completes (the web demo's block sizes, the last size repeating), else None; and the codes left
    for the final, ``finalize`` block (maybe none)."""
    sizes, pending, blocks, unused = list(REFERENCE_BLOCKS), [], [], iter(codes)
    for index in range(count):
        if index % (TEXT_RUN + AUDIO_RUN) >= TEXT_RUN:
            pending.append(next(unused))
        if len(pending) == sizes[0]:
            blocks.append(pending)
            pending = []
            if len(sizes) > 1:
                sizes.pop(0)
        else:
            blocks.append(None)
    return blocks, pending


def reference_model(ours_llm, root: Path, size: str, dtype: torch.dtype, device: torch.device):
    """The remote code's ChatGLMForConditionalGeneration holding our LLM's tensors."""
    folder = root / LLM_CODE
    spec = importlib.util.spec_from_file_location(REFERENCE_PACKAGE, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    sys.modules[REFERENCE_PACKAGE] = importlib.util.module_from_spec(spec)  # its modules import each other relatively
    configuration = importlib.import_module(f"{REFERENCE_PACKAGE}.configuration_chatglm")
    modeling = importlib.import_module(f"{REFERENCE_PACKAGE}.modeling_chatglm")
    config = configuration.ChatGLMConfig(**(FULL_LLM_CONFIG if size == "full" else TINY_LLM_CONFIG))
    config.torch_dtype = dtype  # its layers are built in config.torch_dtype (the published "bfloat16")
    config.max_length = 20  # read by its __init__: transformers 4.x's generation default
    config._attn_implementation = "sdpa"  # what from_pretrained picks for it (_supports_sdpa)
    with torch.device("meta"):
        model = modeling.ChatGLMForConditionalGeneration(config)
    model.load_state_dict(published_state(ours_llm), strict=True, assign=True)
    model._extract_past_from_model_output = lambda outputs: ("past_key_values", outputs.past_key_values)
    return model.to(device).eval()


def reference_decoder(root: Path, size: str, device: torch.device):
    """flow_inference.AudioDecoder loading a decoder folder with our weights (the seed ours draws)."""
    if "torchaudio" not in sys.modules:  # imported by flow_inference.py, not called on this path
        stand_in = types.ModuleType("torchaudio")
        stand_in.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        sys.modules["torchaudio"] = stand_in
    sys.path[:0] = [str(root), str(root / "third_party" / "Matcha-TTS")]
    from flow_inference import AudioDecoder

    with tempfile.TemporaryDirectory() as folder:  # the writer takes any size's config
        folder = write_tiny_decoder(Path(folder), seed=0, config=DecoderConfig() if size == "full" else TINY_DECODER)
        decoder = AudioDecoder(str(folder / "config.yaml"), str(folder / "flow.pt"), str(folder / "hift.pt"),
                               device=str(device))
    decoder.scratch_configs.pop("llm", None)  # its config also builds CosyVoice's text-to-token LM, unused here
    gc.collect()  # (1.2 GB at full size)
    decoder.flow.eval()  # see the module's doc: the web demo leaves both in training mode (dropout on)
    decoder.hift.eval()
    return decoder


class ReferenceServer:
    """model_server.py's ``model.generate(**inputs, max_new_tokens=...)`` for one request, greedy,
    through the model's own generation hooks; ``prefill`` is its first forward, ``step`` each later one."""

    def __init__(self, model) -> None:
        self.model = model

    def prefill(self, **inputs):
        return self.model(**inputs)

    def step(self, **inputs):
        return self.model(**inputs)

    @torch.no_grad()  # as generate
    def generate(self, prompt_ids: list[int], count: int):
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([prompt_ids], device=device)
        kwargs = {"attention_mask": torch.ones_like(input_ids), "use_cache": True}
        for index in range(count):
            inputs = self.model.prepare_inputs_for_generation(input_ids, **kwargs)
            outputs = (self.step if index else self.prefill)(**inputs)
            kwargs = self.model._update_model_kwargs_for_generation(outputs, kwargs)
            token = outputs.logits[:, -1].argmax(-1)
            input_ids = torch.cat([input_ids, token[:, None]], dim=-1)
            yield int(token)  # its TokenStreamer hands each id to the web demo as it comes


def spoken(tokens, count: int, codes: list[int], decode, finish):
    """A reply as the web demo hears it, for either side: (id, the audio of the block it completes,
    else none) per generated id, then (None, ``finish`` of the codes left)."""
    blocks, rest = block_schedule(count, codes)
    for token, block in zip(tokens, blocks):
        yield token, decode(block) if block else np.zeros(0, np.float32)
    yield None, finish(rest)


@torch.inference_mode()  # its in-place cross-fade needs it on CPU tensors
def reference_reply(server: ReferenceServer, decoder, prompt_ids: list[int], codes: list[int], count: int):
    """web_demo.py's loop over one reply: each block through ``token2wav`` with every earlier block's
    codes and mels as its prompt; the last with ``finalize`` (none when no codes are left)."""
    device = decoder.device
    prompt_token, prompt_feat, mels = torch.zeros(1, 0, dtype=torch.int64), torch.zeros(1, 0, 80), []

    def decode(block: list[int], finalize: bool = False) -> np.ndarray:
        nonlocal prompt_token, prompt_feat
        tokens = torch.tensor([block], device=device)
        if mels:
            prompt_feat = torch.cat(mels, dim=-1).transpose(1, 2)
        speech, mel = decoder.token2wav(tokens, uuid="reply", prompt_token=prompt_token.to(device),
                                        prompt_feat=prompt_feat.to(device), finalize=finalize)
        mels.append(mel)
        prompt_token = torch.cat((prompt_token.to(device), tokens), dim=-1)
        return speech[0].float().cpu().numpy()

    yield from spoken(server.generate(prompt_ids, count), count, codes, decode,
                      lambda rest: decode(rest, finalize=True) if rest else np.zeros(0, np.float32))


def our_tokens(engine: SlotEngine, prompt_ids: list[int], count: int):
    """Our side of the same request: one slot's prefill, then batched steps of one."""
    slot = engine.acquire()
    try:
        logits = engine.prefill(slot, prompt_ids)
        for index in range(count):
            token = int(logits.argmax())
            yield token
            if index + 1 < count:
                logits = engine.step([slot], torch.tensor([token]))[0]
    finally:
        engine.release(slot)


def our_reply(engine: SlotEngine, decoder, prompt_ids: list[int], codes: list[int], count: int):
    """Ours: the same blocks through our decoder's "reference" stream (the web demo's computation)."""
    stream = decoder.new_state("reference")
    yield from spoken(our_tokens(engine, prompt_ids, count), count, codes, partial(decoder.step, stream),
                      partial(decoder.finish, stream))


class Recorder(list):
    """A reply's generated ids (the list itself) and its audio (``audio``), kept from the last run."""

    def __init__(self) -> None:
        super().__init__()
        self.audio: list[np.ndarray] = []

    def tee(self, reply):
        """The audio of ``spoken`` pairs, for ``measure``, keeping ids and audio."""
        self.clear()
        self.audio = []
        for token, audio in reply:
            if token is not None:
                self.append(token)
            self.audio.append(audio)
            yield audio


def compare_glm_4_voice(args, device: torch.device) -> list[dict]:
    if args.steps <= TEXT_RUN + REFERENCE_BLOCKS[0]:
        raise SystemExit(f"--steps {args.steps}: the first audio block needs {TEXT_RUN + REFERENCE_BLOCKS[0]} tokens; "
                         "ask for more to measure the RTF after it")
    ours = zoo.load("glm-4-voice", random_weights=args.size, device=str(device), dtype=args.dtype)
    prompt_ids, llm, decoder = ours.prepare(audio=str(QUESTION)).prompt_ids, ours.llm, ours.decoder
    rate = ours.card.output_sample_rate
    del ours  # its speech tokenizer is in neither row (2.5 GB at full size)
    codes = torch.randint(0, 16384, (args.steps,), generator=torch.Generator().manual_seed(0)).tolist()
    records = {"reference": Recorder(), "omni-zoo": Recorder()}
    rows = [_reference_row(llm, prompt_ids, codes, rate, records["reference"], args, device)]
    gc.collect()  # the reference's caches, decoder and joined weights go before our peak memory and sweep
    rows.append(_our_row(llm, decoder, prompt_ids, codes, rate, records["omni-zoo"], args, device))
    budget_ms = 1000 / TOKENS_PER_SECOND
    rows[0]["sessions_at_real_time"] = int(rows[0]["step_ms_p50"] <= budget_ms)  # one generate at a time
    rows[1]["sessions_at_real_time"], rows[1]["batch_sweep"] = sessions_at_real_time(
        args.sessions, partial(our_step_ms, llm, prompt_ids, args.sweep_steps, device), budget_ms)
    checks = agreement(llm, prompt_ids, records["reference"], records["omni-zoo"])
    print(f"greedy ids agree on {checks['agreeing_tokens']} of {args.steps} generated tokens; along the "
          f"reference's reply ours picks its id at {checks['teacher_forced_agreement']:.1%} of them; the audio "
          f"differs by at most {checks['audio_max_difference']}", file=sys.stderr)
    for row in rows:
        row.update(checks, generated_tokens=args.steps, first_block_tokens=REFERENCE_BLOCKS[0])
    return rows


def _reference_row(llm, prompt_ids, codes, rate: int, record: Recorder, args, device: torch.device) -> dict:
    decoder = reference_decoder(args.reference, args.size, device)
    server = ReferenceServer(reference_model(llm, args.reference, args.size, getattr(torch, args.dtype), device))
    return measure("reference", lambda: record.tee(reference_reply(server, decoder, prompt_ids, codes, args.steps)),
                   server, "step", rate, device, args)


def _our_row(llm, decoder, prompt_ids, codes, rate: int, record: Recorder, args, device: torch.device) -> dict:
    engine = SlotEngine(llm, slots=1, max_len=len(prompt_ids) + args.steps + 1)
    return measure("omni-zoo", lambda: record.tee(our_reply(engine, decoder, prompt_ids, codes, args.steps)),
                   engine, "step", rate, device, args)


def agreement(llm, prompt_ids: list[int], reference: Recorder, ours: Recorder) -> dict:
    """Did both sides run the same weights: their greedy ids, ours along the reference's reply, their audio."""
    agreeing = agreeing_prefix(reference, ours)
    theirs, mine = np.concatenate(reference.audio), np.concatenate(ours.audio)
    # with no codes left the reference never finalizes: it loses the held-back tail our finish returns
    shared = min(theirs.size, mine.size)
    return {"agreeing_tokens": agreeing, "teacher_forced_agreement": round(teacher_forced_agreement(llm, prompt_ids, reference), 4),
            "audio_samples": [int(theirs.size), int(mine.size)],
            "audio_max_difference": float(np.abs(theirs[:shared] - mine[:shared]).max())}


@torch.inference_mode()
def teacher_forced_agreement(llm, prompt_ids: list[int], reference_ids: list[int]) -> float:
    """The share of the reference's greedy ids that our network picks from the same prefix, run
    along the reference's reply in one forward (after their first difference the two free-running
    replies no longer compare; in bfloat16 they part early on random weights' flat logits)."""
    ids = torch.tensor([prompt_ids + list(reference_ids[:-1])], device=llm.lm_head.weight.device)
    picks = llm(ids, logits_to_keep=len(reference_ids)).logits[0].argmax(-1).tolist()
    return sum(a == b for a, b in zip(picks, reference_ids)) / len(reference_ids)


def our_step_ms(llm, prompt_ids: list[int], steps: int, device: torch.device, count: int) -> float:
    """The median batched step of ``count`` sessions, each holding the prompt (one prefill for all)."""
    engine = SlotEngine(llm, slots=count, max_len=len(prompt_ids) + steps + 3)
    slots = [engine.acquire() for _ in range(count)]
    tokens = engine.prefill_many(slots, [prompt_ids] * count).argmax(-1)

    def step() -> None:
        nonlocal tokens
        tokens = engine.step(slots, tokens).argmax(-1)

    return median_ms(step, steps, device)


COMPARISON = Comparison(markers=("flow_inference.py", "third_party/Matcha-TTS/matcha/models/components/decoder.py",
                                 f"{LLM_CODE}/modeling_chatglm.py"),
                        dependencies=("transformers", "hyperpyyaml", "omegaconf", "conformer", "diffusers", "lightning",
                                      "hydra", "gdown", "wget", "einops", "scipy"),
                        install="pip install --target DIR hyperpyyaml 'ruamel.yaml<0.18' 'omegaconf==2.3.0' "
                                "'antlr4-python3-runtime==4.9.3' conformer diffusers lightning hydra-core gdown wget "
                                "(--no-deps) and put DIR first on PYTHONPATH (bench/gpu.sh)",
                        run=compare_glm_4_voice, dtypes=("float32", "bfloat16"))
