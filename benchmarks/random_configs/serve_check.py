"""Serve one build through a real tritonserver, the way a user does (`vlm-export repository`, `vlm-export serve`,
`vlm-export ask` over HTTP and streaming gRPC, and the OpenAI-compatible API), and check the served greedy answer against `vlm-export generate`'s
in-process one, then three requests at once (other prompts and images: the server batches them) against theirs.
python serve_check.py BUILD WORK_DIR HTTP_PORT. Prints one line (SERVE OK / DIFF / FAIL ...);
exit 0 only for OK. sweep.sh calls it after each build that passed when SERVE=1."""
import base64, json, os, signal, subprocess, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

build, work, port = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
vx = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "vlm-export")
work.mkdir(parents=True, exist_ok=True)
PROMPT, TOKENS = "What is in the picture?", "12"


def fail(what: str, log: Path | None = None) -> None:
    tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] if log and log.exists() else []
    print(f"SERVE FAIL {what}: {' '.join(tail)[:300]}")
    sys.exit(1)


def printed(out: str) -> str:
    """What `ask` printed, less the one newline print() ends it with (an answer may itself end in newlines)."""
    return out[:-1] if out.endswith("\n") else out


def run(args: list[str], log: Path) -> str:
    with log.open("w") as err:
        done = subprocess.run([vx, *args], stdout=subprocess.PIPE, stderr=err, timeout=900)
    if done.returncode:
        fail(" ".join(args[:1]), log)
    return done.stdout.decode()  # not text=True: its universal newlines would turn an answer's "\r\n" into "\n"


from PIL import Image  # noqa: E402
import numpy as np  # noqa: E402

def request(k: int, prompt: str) -> list[str]:
    image = work / f"image-{k}.png"
    Image.fromarray(np.random.default_rng(k).integers(0, 256, (80 - 8 * k, 64 + 8 * k, 3), dtype=np.uint8)).save(image)
    return ["--prompt", prompt, "--image", str(image), "--max-tokens", TOKENS]


def generated(k: int, ask: list[str]) -> str:
    return json.loads(run(["generate", str(build), *ask, "--json"], work / f"generate-{k}.log").splitlines()[-1])["text"]


ask = request(0, PROMPT)
expected = generated(0, ask)
together = [request(k, p) for k, p in enumerate(["Describe it.", "What colour is the shape on the left, and how many "
                                                  "corners does it have?", "Is there a circle?"], start=1)]
expected_together = [generated(k, a) for k, a in enumerate(together, start=1)]
run(["repository", str(build), "--out", str(work / "repo"), "--force"], work / "repository.log")
serve_log = work / "serve.log"
server = subprocess.Popen([vx, "serve", str(work / "repo"), "--http-port", str(port), "--grpc-port", str(port + 1),
                           "--metrics-port", str(port + 2), "--openai-port", str(port + 3)], stdout=serve_log.open("w"), stderr=subprocess.STDOUT,
                          start_new_session=True)
try:
    deadline = time.time() + 600
    while True:
        if server.poll() is not None:
            fail(f"serve exited {server.returncode}", serve_log)
        if "Press Ctrl-C" in serve_log.read_text(errors="replace"):  # serve's own word: Triton and the API are up
            break
        if time.time() > deadline:
            fail("not ready in 600 s", serve_log)
        time.sleep(2)
    got = {"http": printed(run(["ask", "--url", f"http://127.0.0.1:{port}", *ask], work / "ask-http.log")),
           "grpc-stream": printed(run(["ask", "--url", f"grpc://127.0.0.1:{port + 1}", "--stream", *ask],
                                      work / "ask-grpc.log"))}
    png = base64.b64encode((work / "image-0.png").read_bytes()).decode()
    body = {"model": "repo", "temperature": 0, "max_tokens": int(TOKENS), "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}, {"type": "text", "text": PROMPT}]}]}
    post = urllib.request.Request(f"http://127.0.0.1:{port + 3}/v1/chat/completions", json.dumps(body).encode(),
                                  {"Content-Type": "application/json"})
    try:
        got["openai"] = json.loads(urllib.request.urlopen(post, timeout=300).read())["choices"][0]["message"]["content"]
    except OSError as e:
        got["openai"] = f"<{e}>"
    with ThreadPoolExecutor(len(together)) as pool:
        answers = list(pool.map(lambda ka: printed(run(["ask", "--url", f"http://127.0.0.1:{port}", *ka[1]],
                                                       work / f"ask-{ka[0]}.log")), enumerate(together, start=1)))
    differ = {k: v for k, v in got.items() if v != expected}
    differ |= {f"together-{k}": a for k, (a, e) in enumerate(zip(answers, expected_together), start=1) if a != e}
    if differ:
        print(f"SERVE DIFF generate {expected!r} vs {differ!r}")
        sys.exit(1)
    print(f"SERVE OK {expected!r}, and {len(together)} at once")
finally:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C, as a user stops it
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
