"""A real tritonserver, started on free ports, answering real tritonclient requests. No mocks."""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="serving needs nvidia-pytriton (pip install '.[serve]')")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

import vlm_export  # noqa: E402
from vlm_export.errors import ServeError  # noqa: E402
from vlm_export.serve import server as server_mod  # noqa: E402
from vlm_export.serve.server import TritonServer, execution_env_parameter  # noqa: E402

ADD_ONE_CONFIG = """
backend: "python"
max_batch_size: 8
input [ { name: "X", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "Y", data_type: TYPE_FP32, dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
dynamic_batching { }
"""

# The python backend hands a batch over as a list of requests; it does not concatenate them.
ADD_ONE_MODEL = """
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x + 1)]))
        return out
"""

STREAM3_CONFIG = """
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "X", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "Y", data_type: TYPE_FP32, dims: [ -1 ] } ]
"""

# Streams X+1, X+2, X+3. A negative input gets an error response for that request only: the
# model keeps serving (what issue 5's bad-request handling will rely on).
STREAM3_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            if (x < 0).any():
                error = pb_utils.TritonError("X must be >= 0", pb_utils.TritonError.INVALID_ARG)
                sender.send(pb_utils.InferenceResponse(error=error),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            for i in range(1, 4):
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x + np.float32(i))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""


ENV_PROBE_CONFIG = """
backend: "python"
max_batch_size: 0
input [ { name: "X", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "INFO", data_type: TYPE_STRING, dims: [ 3 ] } ]
"""

# Which Python environment the stub runs in, and whether it sees our (editable) package.
ENV_PROBE_MODEL = """
import sys
import numpy as np
import triton_python_backend_utils as pb_utils
import vlm_export

class TritonPythonModel:
    def execute(self, requests):
        info = np.array([sys.prefix, np.__version__, vlm_export.__file__], dtype=np.object_)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("INFO", info)]) for _ in requests]
"""


def write_model(repo: Path, name: str, config: str, model: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(textwrap.dedent(config).lstrip())
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(model).lstrip())


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("triton_repo")
    write_model(repo, "add_one", ADD_ONE_CONFIG, ADD_ONE_MODEL)
    write_model(repo, "stream3", STREAM3_CONFIG, STREAM3_MODEL)
    write_model(repo, "env_probe", ENV_PROBE_CONFIG, ENV_PROBE_MODEL)
    write_model(repo, "env_probe_exec_env", ENV_PROBE_CONFIG + execution_env_parameter() + "\n", ENV_PROBE_MODEL)
    return repo


@pytest.fixture(scope="session")
def triton(model_repo, tmp_path_factory):
    log = tmp_path_factory.mktemp("triton_log") / "tritonserver.log"
    with TritonServer(model_repo, log_file=log) as server:
        yield server


def port_is_free(port: int) -> bool:
    """Nothing listens there: a new server could bind it. SO_REUSEADDR as servers (Triton too) set
    it, since our own closed client connections may leave the port in TIME_WAIT."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def grpc_client(server: TritonServer):
    # gRPC honours http_proxy/https_proxy even for 127.0.0.1; a local server must not go through one.
    return grpcclient.InferenceServerClient(server.grpc_url, channel_args=[("grpc.enable_http_proxy", 0)])


def fp32_input(module, name: str, array: np.ndarray, datatype: str = "FP32"):
    tensor = module.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_ready(triton):
    assert triton.running and triton.is_ready()
    client = httpclient.InferenceServerClient(triton.http_url)
    try:
        assert client.is_server_ready()
        assert all(client.is_model_ready(m) for m in ("add_one", "stream3", "env_probe", "env_probe_exec_env"))
    finally:
        client.close()


def test_http_infer(triton):
    client = httpclient.InferenceServerClient(triton.http_url)
    try:
        x = np.array([[1.0, 2.0, 3.0], [-1.5, 0.0, 10.0]], dtype=np.float32)
        result = client.infer("add_one", [fp32_input(httpclient, "X", x)])
        np.testing.assert_array_equal(result.as_numpy("Y"), x + 1)
    finally:
        client.close()


@pytest.mark.parametrize("model", ["env_probe", "env_probe_exec_env"])
def test_python_models_run_in_our_environment(triton, model):
    """With or without EXECUTION_ENV_PATH: this venv's numpy (<2, else tensors corrupt) and vlm_export."""
    client = httpclient.InferenceServerClient(triton.http_url)
    try:
        x = fp32_input(httpclient, "X", np.zeros(1, np.float32))
        prefix, numpy_version, package = (v.decode() for v in client.infer(model, [x]).as_numpy("INFO"))
    finally:
        client.close()
    assert prefix == sys.prefix
    assert int(numpy_version.split(".")[0]) < 2
    assert Path(package).resolve() == Path(vlm_export.__file__).resolve()


def stream(client, model: str, x: np.ndarray, request_id: str) -> tuple[list[np.ndarray], Exception | None]:
    """All responses of one streamed request, up to its final flag or its error."""
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(model, [fp32_input(grpcclient, "X", x)], request_id=request_id,
                                  enable_empty_final_response=True)
        outputs = []
        while True:
            result, error = responses.get(timeout=30)
            if error is not None:
                return outputs, error
            assert result.get_response().id == request_id
            if result.as_numpy("Y") is not None:
                outputs.append(result.as_numpy("Y"))
            if result.get_response().parameters["triton_final_response"].bool_param:
                return outputs, None
    finally:
        client.stop_stream()


def test_grpc_streaming(triton):
    client = grpc_client(triton)
    try:
        x = np.array([0.5, 2.0], dtype=np.float32)
        outputs, error = stream(client, "stream3", x, "r1")
        assert error is None
        assert len(outputs) == 3
        for i, y in enumerate(outputs, start=1):
            np.testing.assert_array_equal(y, x + i)
    finally:
        client.close()


def test_bad_requests_get_errors_and_server_keeps_serving(triton):
    http = httpclient.InferenceServerClient(triton.http_url)
    grpc = grpc_client(triton)
    good = np.array([[1.0, 2.0]], dtype=np.float32)
    try:
        with pytest.raises(InferenceServerException, match="(?i)data.?type|INT32"):
            http.infer("add_one", [fp32_input(httpclient, "X", good.astype(np.int32), "INT32")])
        with pytest.raises(InferenceServerException, match="(?i)shape|dims"):
            http.infer("add_one", [fp32_input(httpclient, "X", np.ones((1, 2, 2), np.float32))])
        with pytest.raises(InferenceServerException, match="(?i)batch"):
            http.infer("add_one", [fp32_input(httpclient, "X", np.ones((9, 2), np.float32))])
        with pytest.raises(InferenceServerException, match="(?i)unknown|not found|no_such"):
            http.infer("no_such_model", [fp32_input(httpclient, "X", good)])
        # An error response from inside the decoupled model, for this request only.
        outputs, error = stream(grpc, "stream3", np.array([-1.0], np.float32), "bad")
        assert outputs == [] and "X must be >= 0" in str(error)

        assert http.is_server_ready() and http.is_model_ready("add_one") and http.is_model_ready("stream3")
        np.testing.assert_array_equal(http.infer("add_one", [fp32_input(httpclient, "X", good)]).as_numpy("Y"), good + 1)
        outputs, error = stream(grpc, "stream3", np.array([1.0], np.float32), "after")
        assert error is None and [float(y[0]) for y in outputs] == [2.0, 3.0, 4.0]
    finally:
        http.close()
        grpc.close()


def test_stops_cleanly(model_repo, tmp_path):
    server = TritonServer(model_repo, log_file=tmp_path / "triton.log").start()
    try:
        ports = {"http": server.http_port, "grpc": server.grpc_port, "metrics": server.metrics_port}
        assert len(set(ports.values())) == 3
        assert [name for name, port in ports.items() if port_is_free(port)] == []  # all listening
        pid = server.pid
        assert server.stop() == 0  # SIGTERM was enough: Triton unloaded the models and exited
    finally:
        server.stop()
    assert server.process.poll() is not None and not group_alive(pid)  # no stub left behind
    assert [name for name, port in ports.items() if not port_is_free(port)] == []
    assert server.stop() == 0  # stopping twice is harmless


def test_model_that_fails_to_load_raises_with_log(tmp_path):
    write_model(tmp_path / "repo", "broken", ADD_ONE_CONFIG, "raise ImportError('no such thing')\n")
    started = time.monotonic()
    with pytest.raises(ServeError, match="no such thing") as excinfo:
        TritonServer(tmp_path / "repo", log_file=tmp_path / "triton.log", startup_timeout=600).start()
    first = str(excinfo.value).splitlines()[0]  # what the CLI prints: the reason on it, not only in the log
    assert "exited with code" in first and "no such thing" in first
    # it said so when Triton exited (about 2 s here), not after waiting out startup_timeout
    assert time.monotonic() - started < 300


def test_a_backend_the_server_lacks_is_named_before_it_starts(tmp_path):
    """The bundled Triton has the python backend only: a repository that also needs ONNX Runtime's is refused
    at once, naming the models and the fix (Triton itself would load the python models first, then fail)."""
    write_model(tmp_path / "repo", "add_one", ADD_ONE_CONFIG, ADD_ONE_MODEL)
    (tmp_path / "repo" / "graph" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "graph" / "config.pbtxt").write_text('name: "graph"\nplatform: "onnxruntime_onnx"\n')
    started = time.monotonic()
    with pytest.raises(ServeError, match=r"^model\(s\) graph of .* need Triton's onnxruntime backend, which .* does "
                                         r"not have \(its backends, in .*: python\); .* --target python"):
        TritonServer(tmp_path / "repo", log_file=tmp_path / "triton.log").start()
    assert time.monotonic() - started < 5 and not (tmp_path / "triton.log").exists()  # nothing was started
    # a model that brings its own backend library is Triton's to load
    (tmp_path / "repo" / "graph" / "config.pbtxt").write_text('name: "graph"\nbackend: "mine"\n')
    (tmp_path / "repo" / "graph" / "libtriton_mine.so").write_bytes(b"")
    server_mod.check_backends(tmp_path / "repo", server_mod.find_tritonserver().backend_dir, Path("tritonserver"))


def test_missing_binary_says_what_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(server_mod, "_pytriton_server_dir", lambda: None)
    with pytest.raises(ServeError, match=r"pip install nvidia-pytriton==0\.7\.0"):
        server_mod.find_tritonserver()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_forever_stops_on_signal(model_repo, sig, tmp_path):
    code = ("import sys; from vlm_export.serve.server import serve_forever; "
            "sys.exit(serve_forever(sys.argv[1], log_file=sys.argv[2]))")
    proc = subprocess.Popen([sys.executable, "-u", "-c", code, str(model_repo), str(tmp_path / "triton.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server_pid = None
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Press Ctrl-C"):
                break
        banner = "".join(lines)
        assert "HTTP     http://127.0.0.1:" in banner and "gRPC     127.0.0.1:" in banner, banner
        server_pid = int(banner.split("(pid ")[1].split(")")[0])
        http_port = int(banner.split("HTTP     http://127.0.0.1:")[1].split()[0])
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=120)
    finally:
        # tritonserver runs in a session of its own: killing our subprocess would not reach it
        if proc.poll() is None:
            proc.terminate()  # serve_forever stops the server on SIGTERM, even while it starts
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.returncode != 0 and server_pid is not None and group_alive(server_pid):
            os.killpg(server_pid, signal.SIGKILL)
    assert proc.returncode == 0, rest
    assert "Stopped." in rest
    assert not group_alive(server_pid) and port_is_free(http_port)
    assert "Started GRPCInferenceService" in (tmp_path / "triton.log").read_text()  # the log went where asked
