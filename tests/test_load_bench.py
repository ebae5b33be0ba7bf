"""bench/load.py --spawn measures the model it is asked for: the server it starts serves --model
(it once started the default model whatever --model said, and labelled the run with it)."""
import json
import subprocess
import sys

from conftest import REPO


def test_the_spawned_server_serves_the_model_asked_for(tmp_path):
    done = subprocess.run([sys.executable, "bench/load.py", "--spawn", "--tiny", "--model", "glm-4-voice",
                           "--clients", "2", "--requests-per-client", "1", "--max-tokens", "30", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = [json.loads(f.read_text()) for f in tmp_path.glob("*_load_*.json")]
    assert result["model"] == "glm-4-voice"
    (level,) = result["levels"]
    assert level["clients"] == 2 and level["errors"] == 0 and level["ttfa_ms_p50"] > 0
