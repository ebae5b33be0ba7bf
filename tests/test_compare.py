"""bench/compare.py: every model with a side-by-side module (bench/compare_<model>.py) is offered,
and a wrong checkout is one clear line before anything loads (the references themselves are never
part of this repository; their runs are in bench/results/*_compare_*)."""
import subprocess
import sys

import pytest
from conftest import REPO

MODELS = sorted(p.stem.removeprefix("compare_").replace("_", "-") for p in (REPO / "bench").glob("compare_*.py"))


def test_every_comparison_module_is_a_model_of_the_zoo():
    import zoo

    assert "mini-omni" in MODELS and set(MODELS) <= set(zoo.names())


@pytest.mark.parametrize("model", MODELS)
def test_a_checkout_without_the_reference_code_is_one_clear_error(model, tmp_path):
    done = subprocess.run([sys.executable, "bench/compare.py", "--model", model, "--reference", str(tmp_path),
                           "--size", "tiny", "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"--reference {tmp_path}: no " in done.stderr and f"checkout of the {model} reference" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_sweep_keeps_the_largest_count_within_the_budget_and_stops_past_it():
    sys.path.insert(0, str(REPO / "bench"))
    from comparison import sessions_at_real_time

    steps = {1: 10.0, 2: 20.0, 4: 40.0, 8: 80.0, 16: 30.0}
    best, sweep = sessions_at_real_time([1, 2, 4, 8, 16], steps.__getitem__, budget_ms=50.0)
    assert best == 4 and [s["sessions"] for s in sweep] == [1, 2, 4, 8]  # 16 never measured: 8 was over


def test_agreement_counts_the_outputs_both_sides_share_from_the_first():
    sys.path.insert(0, str(REPO / "bench"))
    from comparison import agreeing_prefix

    assert agreeing_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2  # a later match after a difference does not count
    assert agreeing_prefix([[1, 5], [2, 6]], [[1, 5], [2, 7]]) == 1  # a frame agrees when all its codes do
    assert agreeing_prefix([1, 2, 3], [1, 2]) == 2 and agreeing_prefix([], []) == 0


@pytest.mark.parametrize("model", ["moshi", "hertz-dev"])
def test_our_side_of_a_duplex_comparison_times_batched_steps(model):
    """What the comparisons time on our side runs without any reference (it once called
    bench/duplex.py's step_times with an out-of-date signature, unnoticed without a checkout)."""
    import argparse

    import torch

    import zoo

    sys.path.insert(0, str(REPO / "bench"))
    from comparison import duplex_step_ms

    ours = zoo.load(model, random_weights="tiny", device="cpu", dtype="float32")
    assert duplex_step_ms(ours, argparse.Namespace(sweep_steps=2), torch.device("cpu"), 2) > 0


def test_our_side_of_the_mini_omni_comparison_times_batched_steps():
    import argparse

    import torch

    import zoo

    sys.path.insert(0, str(REPO / "bench"))
    from compare_mini_omni import _our_step_ms

    ours = zoo.load("mini-omni", random_weights="tiny", device="cpu", dtype="float32")
    assert _our_step_ms(ours, 2, argparse.Namespace(sweep_steps=2), torch.device("cpu")) > 0


def test_the_int8_comparison_measures_its_agreement_with_the_float32_twin():
    """``--dtype int8``: ours teacher-forced along the float32 draw of the same seed. A model
    agrees with itself at every position; int8 agrees closely but not everywhere (tiny, 30 steps)."""
    sys.path.insert(0, str(REPO / "bench"))
    from compare_mini_omni import COMPARISON, token_agreement

    import zoo

    assert "int8" in COMPARISON.dtypes
    twin = zoo.load("mini-omni", random_weights="tiny", device="cpu", dtype="float32")
    same = token_agreement(zoo.load("mini-omni", random_weights="tiny", device="cpu", dtype="float32"), twin, 30)
    assert same == {"positions": 30, "compared": 30, "tokens_agreeing": 1.0, "positions_all_agreeing": 1.0,
                    "first_disagreement": None}
    int8 = token_agreement(zoo.load("mini-omni", random_weights="tiny", device="cpu", dtype="int8"), twin, 30)
    assert int8["compared"] == 30 and 0.9 < int8["tokens_agreeing"] < 1.0


def test_the_glm_comparison_decodes_the_web_demos_blocks_along_the_trained_interleave():
    """13 text tokens, then 26 audio tokens, repeated: the first block (25 audio codes, the web
    demo's first size) is complete at token 38, the next (50) at token 114; the codes left at the
    end are the final block; every code is used once, in order."""
    sys.path.insert(0, str(REPO / "bench"))
    from compare_glm_4_voice import block_schedule

    codes = list(range(1000, 1120))
    blocks, rest = block_schedule(120, codes)
    done = [(index, block) for index, block in enumerate(blocks) if block]
    assert [(index, len(block)) for index, block in done] == [(37, 25), (113, 50)]
    assert len(blocks) == 120 and rest == codes[75:78]  # 120 tokens: 3 x 26 of them audio
    assert [code for _, block in done for code in block] + rest == codes[:78]


def test_our_side_of_the_glm_comparison_is_greedy_decoding_and_times_batched_steps():
    """What ours generates in the comparison is the LLM's own greedy continuation (transformers'
    generate on the same network), and the batch sweep runs without a reference."""
    import torch

    import zoo

    sys.path.insert(0, str(REPO / "bench"))
    from compare_glm_4_voice import our_step_ms, our_tokens

    from zoo.glm4_voice.engine import SlotEngine

    ours = zoo.load("glm-4-voice", random_weights="tiny", device="cpu", dtype="float32")
    ids = ours.prepare(text="What is the weather like?").prompt_ids
    with torch.inference_mode():
        greedy = ours.llm.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert list(our_tokens(SlotEngine(ours.llm, slots=1, max_len=len(ids) + 12), ids, 12)) == greedy
    assert our_step_ms(ours.llm, ids, 2, torch.device("cpu"), 2) > 0
