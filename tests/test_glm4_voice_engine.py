"""The slot engine (GLM-4-Voice's decode loop over session slots) computes what GlmForCausalLM
computes: prefill and batched steps for slots at different lengths, joining and leaving."""
import pytest
import torch

from zoo.glm4_voice.engine import SlotEngine
from zoo.glm4_voice.llm import load_llm
from zoo.glm4_voice.random_weights import write_tiny_llm


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return load_llm(write_tiny_llm(tmp_path_factory.mktemp("glm_llm")), dtype=torch.float64)


def full_forward(llm, ids):
    with torch.inference_mode():
        return llm(torch.tensor([ids])).logits[0, -1]


def test_prefill_and_batched_steps_equal_the_full_forward(llm):
    engine = SlotEngine(llm, slots=4, max_len=64)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 168960, (n,), generator=generator).tolist() for n in (7, 12, 3)]
    slots = [engine.acquire() for _ in prompts]
    for slot, ids in zip(slots, prompts):
        torch.testing.assert_close(engine.prefill(slot, ids), full_forward(llm, ids), rtol=0, atol=1e-12)
    nxt = [5, 77, 151336]
    logits = engine.step(slots, torch.tensor(nxt))
    for row, ids, token in zip(logits, prompts, nxt):
        torch.testing.assert_close(row, full_forward(llm, ids + [token]), rtol=0, atol=1e-12)
    # the middle slot leaves; the others go on as a non-contiguous batch; a new one joins its row
    engine.release(slots[1])
    logits = engine.step([slots[0], slots[2]], torch.tensor([9, 10]))
    torch.testing.assert_close(logits[0], full_forward(llm, prompts[0] + [5, 9]), rtol=0, atol=1e-12)
    torch.testing.assert_close(logits[1], full_forward(llm, prompts[2] + [151336, 10]), rtol=0, atol=1e-12)
    joined = engine.acquire()
    assert joined == slots[1]
    torch.testing.assert_close(engine.prefill(joined, [1, 2, 3]), full_forward(llm, [1, 2, 3]), rtol=0, atol=1e-12)


def test_the_context_limit_is_an_error_not_a_wrap_around(llm):
    engine = SlotEngine(llm, slots=1, max_len=8)
    slot = engine.acquire()
    with pytest.raises(ValueError, match="positions"):
        engine.prefill(slot, list(range(9)))
    engine.prefill(slot, list(range(8)))
    assert engine.room(slot) == 0
    with pytest.raises(ValueError, match="context limit"):
        engine.step([slot], torch.tensor([1]))
    with pytest.raises(RuntimeError, match="no free"):
        engine.acquire()
