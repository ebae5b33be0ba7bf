"""inference.py as a user runs it, in a subprocess."""
import json
import os
import subprocess
import sys
import time

import soundfile as sf
from conftest import REPO


def run_cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "inference.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_tiny_end_to_end_writes_wavs_summary_and_says_it_is_noise(tmp_path, transcripts):
    result = run_cli("--tiny", "--output-dir", str(tmp_path), "--max-new-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert "RANDOM WEIGHTS" in result.stderr and "RANDOM WEIGHTS" in result.stdout
    run_dir = next((tmp_path / "mini-omni").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["random_weights"] == "tiny"
    assert [r["question"] for r in summary["results"]] == [transcripts[k] for k in sorted(transcripts)]
    for i, r in enumerate(summary["results"]):
        audio, rate = sf.read(run_dir / f"{i:02d}.wav")
        assert rate == 24000 and r["audio_s"] > 0 and abs(audio.size / rate - r["audio_s"]) < 1e-3
        assert r["ttfa_ms"] > 0 and r["rtf"] > 0
        assert r["question"] in result.stdout  # the table
    assert "TTFA ms" in result.stdout and "RTF" in result.stdout


def test_text_question_and_own_input_files(tmp_path, question_wav):
    result = run_cli("--tiny", "--output-dir", str(tmp_path), "--max-new-tokens", "16", "--text", "Tell me a joke.")
    assert result.returncode == 0, result.stderr
    assert "Tell me a joke." in result.stdout
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    result = run_cli("--tiny", "--output-dir", str(tmp_path), "--max-new-tokens", "16", "--input", str(question_wav[0]), str(bad))
    assert result.returncode == 1  # one file failed, the other was answered
    assert "could not decode" in result.stdout and "Traceback" not in result.stderr
    assert "answered 1 of 2 questions" in result.stdout and "error: 1 of 2 questions failed" in result.stderr
    summary = json.loads(sorted((tmp_path / "mini-omni").iterdir())[-1].joinpath("summary.json").read_text())
    assert "wav" in summary["results"][0] and "error" in summary["results"][1]


def test_without_weights_or_network_it_fails_fast_with_the_way_out(tmp_path):
    started = time.monotonic()
    result = run_cli(env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}, timeout=120)
    assert result.returncode == 2
    assert time.monotonic() - started < 60
    assert "gpt-omni/mini-omni" in result.stderr and "--checkpoint DIR" in result.stderr and "--tiny" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_gpu_or_bad_dtype_is_a_clear_error(tmp_path):
    for flags, message in [(["--device", "cuda"], "CUDA was requested"), (["--dtype", "float8"], "unknown dtype")]:
        result = run_cli("--tiny", "--output-dir", str(tmp_path), *flags, timeout=120)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_every_model_answers_through_the_same_cli(tmp_path, question_wav):
    """No model-specific code in inference.py: GLM-4-Voice and Hertz-dev run through it as they are."""
    import zoo

    for name in ("glm-4-voice", "hertz-dev"):
        result = run_cli("--model", name, "--tiny", "--output-dir", str(tmp_path), "--max-new-tokens", "12",
                         "--input", str(question_wav[0]), env={"OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr
        run_dir = next((tmp_path / name).iterdir())
        summary = json.loads((run_dir / "summary.json").read_text())
        audio, rate = sf.read(run_dir / "00.wav")
        assert rate == zoo.card(name).output_sample_rate and audio.size > 0
        assert summary["random_weights"] == "tiny"


def test_a_missing_input_file_is_named_with_the_reason_before_anything_loads(tmp_path, question_wav):
    started = time.monotonic()
    result = run_cli("--tiny", "--output-dir", str(tmp_path), "--input", str(question_wav[0]), str(tmp_path / "nope.wav"),
                     str(tmp_path), timeout=120)
    assert result.returncode == 2 and time.monotonic() - started < 60
    assert f"error: --input {tmp_path / 'nope.wav'}: no such file" in result.stderr
    assert f"error: --input {tmp_path}: is a folder, not an audio file" in result.stderr
    assert "System error" not in result.stderr + result.stdout and "Traceback" not in result.stderr


def run_in_process(monkeypatch, capsys, tmp_path, *args):
    """inference.main() in this process, so a test can make the model fail in ways no flag can."""
    import inference

    code = inference.main(["--tiny", "--output-dir", str(tmp_path), "--max-new-tokens", "8", *args])
    out = capsys.readouterr()
    return inference, code, out.out, out.err


def test_a_model_failing_on_one_question_is_one_line_and_the_traceback_is_logged(monkeypatch, capsys, tmp_path):
    import inference

    real = inference.answer
    calls = []

    def flaky(model, question, options):
        calls.append(question)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(model, question, options)

    monkeypatch.setattr(inference, "answer", flaky)
    _, code, out, err = run_in_process(monkeypatch, capsys, tmp_path)
    assert code == 1 and len(calls) == 5  # the failure did not stop the other questions
    run_dir = next((tmp_path / "mini-omni").iterdir())
    log = (run_dir / "inference.log").read_text()
    assert "Traceback" in log and "illegal memory access" in log
    assert "Traceback" not in out + err
    assert f"RuntimeError: CUDA error: an illegal memory access was encountered); traceback in {run_dir / 'inference.log'}" in out
    assert "answered 4 of 5 questions" in out and "error: 1 of 5 questions failed" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert ["error" in r for r in summary["results"]] == [False, True, False, False, False]


def test_an_unexpected_load_failure_is_one_line_with_the_log_path(monkeypatch, capsys, tmp_path):
    import inference

    def broken(args, seed=0):
        raise KeyError("model.layers.0.attn.weight")

    monkeypatch.setattr(inference, "load_model", broken)
    _, code, out, err = run_in_process(monkeypatch, capsys, tmp_path)
    log_path = next((tmp_path / "mini-omni").iterdir()) / "inference.log"
    assert code == 2 and "Traceback" not in err
    assert err.strip() == (f"error: loading mini-omni failed (KeyError: 'model.layers.0.attn.weight'); "
                           f"the traceback is in {log_path}")
    assert "Traceback" in log_path.read_text()
