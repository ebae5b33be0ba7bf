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
