"""bench/load.py --spawn measures the model it is asked for: the server it starts serves --model
(it once started the default model whatever --model said, and labelled the run with it); both of
its modes (levels of clients, simulated users) run end to end."""
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


def test_simulated_users_hold_turns_and_say_what_served_them(tmp_path):
    """``--users``: each user talks, listens to a whole reply and thinks, over and over, for the
    duration; the run counts the completed turns and names the server and machine it measured."""
    done = subprocess.run([sys.executable, "bench/load.py", "--spawn", "--tiny", "--users", "2", "--duration", "5",
                           "--talk-s", "0.3", "--think-s", "0.3", "--max-tokens", "20", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = [json.loads(f.read_text()) for f in tmp_path.glob("*_users_*.json")]
    assert result["model"] == "mini-omni" and result["server"] == "single process" and result["random_weights"]
    assert result["users"] == 2 and result["errors"] == 0 and result["completed_turns"] >= 2
    assert result["ttfa_ms_p50"] > 0 and "cores" in result["machine"]
    assert "| 2 |" in (tmp_path / "users.md").read_text()  # its row in the table
