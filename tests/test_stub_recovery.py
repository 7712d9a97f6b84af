"""Issue #18 item 1: a python-backend stub that dies (what the kernel's OOM killer does) must not
be a permanent, invisible outage. A real tritonserver (nvidia-pytriton), real clients, real
SIGKILLs; no mocks.

Triton 2.51 never restarts a dead stub, leaves the requests it was streaming hanging and keeps
answering ready (serve/NOTES.md); TritonServer's supervisor restarts the server instead.
"""
from __future__ import annotations

import os
import signal
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("pytriton", reason="serving needs nvidia-pytriton (pip install '.[serve]')")
pytest.importorskip("tritonclient.grpc")

from vlm_export.client.client import VLMClient  # noqa: E402
from vlm_export.errors import VlmExportError  # noqa: E402
from vlm_export.model_repository.render import RepositoryOptions, render_repository  # noqa: E402
from vlm_export.serve.server import TritonServer  # noqa: E402
from conftest import wait_for  # noqa: E402

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _ready(server: TritonServer, path: str) -> bool:
    """GET ``path`` answers 200; a refused connection or another status is not ready."""
    try:
        with _NO_PROXY.open(f"http://{server.http_url}{path}", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text()


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    members = []
    for name in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{name}/stat").read_text() if name.isdigit() else ""
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(name))
    return members


def _group_alive(pgid: int) -> bool:
    """Some process of the group is still running, 30 s after it was killed."""
    return not wait_for(lambda: not _group_members(pgid), 30)


def _stub_pid(server: TritonServer, model: str) -> int:
    """The one stub of ``model``; the supervisor lists a new server's stubs within its rescan period."""
    def pids():
        return [pid for pid, stub in server.stubs.items() if stub.model == model]
    assert wait_for(lambda: len(pids()) == 1, 30), server.stubs
    pids = pids()
    assert "triton_python_backend_stub" in Path(f"/proc/{pids[0]}/cmdline").read_text()
    return pids[0]


@pytest.fixture(scope="module")
def recovering(tiny_build, tmp_path_factory):
    """One supervised server of the tiny llava repository for both protocols' kills (a start or a
    restart loads the vlm model: 20-60 s here): (server, its events, the pids it ran as).
    Stopped at the end whatever happens; test_stop_after_restarts checks that stop."""
    build = tiny_build("llava-llama").path
    folder = tmp_path_factory.mktemp("recovery")
    repo = render_repository(build, folder / "repo", RepositoryOptions())
    events: list[str] = []
    # a restart is a full model load: on a loaded machine it may take minutes, not the default 120 s
    server = TritonServer(repo, log_file=folder / "triton.log", on_event=events.append, startup_timeout=300)
    server_pids: list[int] = []
    try:
        server.start()
        server_pids.append(server.pid)
        yield server, events, server_pids
    finally:
        server.stop()  # the supervisor first, then the whole process group


def _kill_mid_stream(server: TritonServer, client: VLMClient, prompt: str, stub: int) -> dict:
    """Stream a long answer and SIGKILL the vlm stub once the first piece has arrived; watch readiness
    from the kill until a normal request is answered again. What the stream's caller saw and when."""
    outcome: dict = {"restarts": server.restarts}

    def stream():
        pieces = 0
        try:
            for event in client.stream(prompt, max_tokens=200, ignore_eos=True):
                pieces += 1
                if pieces == 1:
                    os.kill(stub, signal.SIGKILL)
                    outcome["killed"] = time.monotonic()
            outcome["result"] = event
        except Exception as err:  # noqa: BLE001 - what the caller of the client sees
            outcome["error"] = err
        outcome["ended"] = time.monotonic()

    streaming = threading.Thread(target=stream, daemon=True)
    streaming.start()
    deadline = time.monotonic() + 330  # the kill comes within seconds of the start
    outcome["saw_not_ready"] = False
    while time.monotonic() < deadline and "recovered" not in outcome:
        if "killed" not in outcome:
            if "ended" in outcome:
                break  # the stream ended before the kill: reported by the caller
            time.sleep(0.02)
            continue
        if not _ready(server, "/v2/models/vlm/ready"):
            outcome["saw_not_ready"] = True
        elif server.restarts > outcome["restarts"]:
            try:
                outcome["answer"] = client.generate(prompt, max_tokens=12).text
                outcome["recovered"] = time.monotonic()
            except VlmExportError:
                pass
        time.sleep(0.1)
    streaming.join(timeout=30)
    return outcome


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_vlm_stub_killed_mid_request_recovers(recovering, protocol):
    server, events, server_pids = recovering
    url = f"grpc://{server.grpc_url}" if protocol == "grpc" else f"http://{server.http_url}"
    client = VLMClient(url, timeout=120)
    prompt = "Tell me a long story."
    for attempt in range(2):
        restarts, seen = server.restarts, len(events)
        before = client.generate(prompt, max_tokens=12).text
        assert _ready(server, "/v2/models/vlm/ready")
        stub = _stub_pid(server, "vlm")
        # the kill comes when the first piece reaches the client; a tiny model may already have
        # written all 200 tokens by then (seen once in CI, under load): then the kill was not
        # mid-request and the scenario runs once more, after the restart that kill caused
        outcome = _kill_mid_stream(server, client, prompt, stub)
        if "result" not in outcome or attempt == 1:
            break
        assert wait_for(lambda: "serving again" in events[-1], 300), events
        server_pids.append(server.pid)
    log_tail = server.log_file.read_text()[-3000:]
    new_events = events[seen:]

    assert "killed" in outcome, (outcome, log_tail)
    # the in-flight request ended with an error, soon (measured: 0.7 s)
    assert "error" in outcome, (outcome, log_tail)
    assert isinstance(outcome["error"], VlmExportError), repr(outcome["error"])
    assert outcome["ended"] - outcome["killed"] < 60, outcome
    # readiness said so, and the supervisor restarted the server once
    assert outcome["saw_not_ready"]
    assert server.restarts == restarts + 1, new_events
    # what it saw: the dead stub, or Triton itself aborting when the stub died holding a lock
    # (boost::interprocess::lock_exception: it happens now and then)
    assert ("stub vlm_0_0 of model 'vlm'" in new_events[0] and "SIGKILL" in new_events[0]
            or "tritonserver" in new_events[0] and "SIGABRT" in new_events[0]), new_events
    assert f"Restarting tritonserver (restart {restarts + 1}" in new_events[0], new_events
    # (Triton answers ready a moment before its start-up ends: the supervisor reports after that)
    assert wait_for(lambda: "serving again" in events[-1], 60), events
    # and it answers exactly as before, on the same ports. Measured: 25 s on an idle 2-core
    # machine, 57 s under load (a restart is a full model load); the bound leaves room for a
    # loaded CI machine rather than flake, and the time is printed
    assert "recovered" in outcome, (new_events, log_tail)
    print(f"recovered {outcome['recovered'] - outcome['killed']:.1f} s after the kill")
    assert outcome["recovered"] - outcome["killed"] < 300, (new_events, log_tail)
    assert outcome["answer"] == before
    server_pids.append(server.pid)
    assert server_pids[-2] != server_pids[-1] and not _alive(server_pids[-2])
    assert not _alive(stub)
    assert _stub_pid(server, "vlm") != stub


def test_stop_after_restarts(recovering):
    """After the restarts above, stop() is prompt, the last server stops in order (exit 0), and
    nothing of any of the server's process groups is left."""
    server, events, server_pids = recovering
    started = time.monotonic()
    server.stop()  # the supervisor first, then the whole process group
    # SIGTERM, then SIGKILL after stop_timeout (10 s) + a 10 s grace at worst: a hang shows past that
    assert time.monotonic() - started < 60
    assert server.process.returncode == 0, events  # the new server stopped in order
    assert not any(_group_alive(pid) for pid in server_pids)
    assert server._supervisor is not None and not server._supervisor.is_alive()


# ------------------------------------------------------------------ the supervisor's edges, on a tiny model

ADD_ONE_CONFIG = """
backend: "python"
max_batch_size: 0
input [ { name: "X", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "Y", data_type: TYPE_FP32, dims: [ -1 ] } ]
"""

ADD_ONE_MODEL = """
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy() + 1)]) for r in requests]
"""


@pytest.fixture(scope="module")
def add_one_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("add_one_repo")
    (repo / "add_one" / "1").mkdir(parents=True)
    (repo / "add_one" / "config.pbtxt").write_text(textwrap.dedent(ADD_ONE_CONFIG).lstrip())
    (repo / "add_one" / "1" / "model.py").write_text(textwrap.dedent(ADD_ONE_MODEL).lstrip())
    return repo


def _add_one(server: TritonServer, x: float) -> float:
    import numpy as np
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    try:
        inp = httpclient.InferInput("X", [1], "FP32")
        inp.set_data_from_numpy(np.array([x], dtype=np.float32))
        return float(client.infer("add_one", [inp]).as_numpy("Y")[0])
    finally:
        client.close()  # an open keep-alive connection would hold up the server's stop


def test_server_death_restarts_then_gives_up_past_the_limit(add_one_repo, tmp_path):
    """tritonserver itself killed: restarted on the same ports. Past max_restarts: stopped for
    good, ``failure`` says why, ``wait()`` returns, nothing is left running."""
    server = TritonServer(add_one_repo, log_file=tmp_path / "triton.log", max_restarts=1, on_event=lambda m: None)
    server.start()
    pids = [server.pid]
    try:
        ports = (server.http_port, server.grpc_port, server.metrics_port)
        assert _add_one(server, 1.0) == 2.0
        assert not server.wait(timeout=0.1)
        os.kill(server.pid, signal.SIGKILL)
        assert wait_for(lambda: server.events and "serving again" in server.events[-1], 60), server.events
        assert server.restarts == 1 and server.is_ready()
        pids.append(server.pid)
        assert (server.http_port, server.grpc_port, server.metrics_port) == ports
        assert _add_one(server, 2.0) == 3.0
        assert "killed by signal 9 (SIGKILL)" in server.events[0]

        stub = _stub_pid(server, "add_one")
        os.kill(stub, signal.SIGKILL)
        assert server.wait(timeout=30), server.events
        assert server.failure is not None and "gave up" in str(server.failure)
        assert "of model 'add_one'" in str(server.failure) and "SIGKILL" in str(server.failure)
        assert not server.running and not server.is_ready()
        assert "gave up" in server.events[-1] and server.restarts == 1
        assert "supervisor: gave up" in (tmp_path / "triton.log").read_text()
    finally:
        server.stop()
    assert not any(_group_alive(pid) for pid in pids)


def test_stop_while_restarting_is_prompt(add_one_repo, tmp_path):
    server = TritonServer(add_one_repo, log_file=tmp_path / "triton.log", on_event=lambda m: None)
    server.start()
    first = server.pid
    try:
        os.kill(_stub_pid(server, "add_one"), signal.SIGKILL)
        assert wait_for(lambda: server.restarts == 1, 60), server.events  # a new server is starting
    finally:
        started = time.monotonic()
        server.stop()
    # a restart still loading is killed at once (a stop in order waits up to stop_timeout + 10 s grace)
    assert time.monotonic() - started < 15
    assert not _group_alive(first) and not _group_alive(server.pid)
    assert not server._supervisor.is_alive() and server.wait(timeout=0)
