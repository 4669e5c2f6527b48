"""The real HTTP server on loopback, driven by a real HTTP client."""
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from diffprune.cli import main
from diffprune.serve import Service, create_app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def diffs(tmp_path_factory, tiny_model_dir, tiny_glue):
    root = tmp_path_factory.mktemp("serve")
    for task in ("sst2", "stsb"):
        assert main(["-q", "train", "--task", task, "--data-dir", str(tiny_glue), "--model",
                     str(tiny_model_dir), "--out", str(root / task), "--epochs", "1",
                     "--fixmask-epochs", "1", "--density", "0.05", "--lr", "1e-2"]) == 0
    return root


@pytest.fixture(scope="module")
def server(diffs):
    service = Service(None, {"sst2": str(diffs / "sst2" / "diff")})
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port,
                                        log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        yield client
    srv.should_exit = True
    thread.join(timeout=10)


def test_health_predict_and_runtime_add(server, diffs, tmp_path):
    assert server.get("/health").json() == {"status": "ok", "tasks": 1}
    r = server.post("/v1/predict", json={"task": "sst2", "inputs": ["the film was great"]})
    assert r.status_code == 200
    pred = r.json()["predictions"][0]
    assert pred["label"] in {"0", "1"} and abs(sum(pred["scores"].values()) - 1) < 1e-5

    # a corrupt diff is refused and the served task is untouched
    bad = tmp_path / "bad"
    shutil.copytree(diffs / "stsb" / "diff", bad)
    (bad / "diff.safetensors").write_bytes(b"garbage")
    r = server.post("/v1/tasks", json={"name": "stsb", "path": str(bad)})
    assert r.status_code == 400 and "refused" in r.json()["detail"]
    again = server.post("/v1/predict", json={"task": "sst2", "inputs": ["the film was great"]})
    assert again.json()["predictions"][0] == pred

    r = server.post("/v1/tasks", json={"name": "stsb", "path": str(diffs / "stsb" / "diff")})
    assert r.status_code == 201
    names = [t["name"] for t in server.get("/v1/tasks").json()]
    assert names == ["sst2", "stsb"]
    r = server.post("/v1/predict", json={"task": "stsb", "inputs": [["a film", "a movie"]]})
    assert set(r.json()["predictions"][0]) == {"score"}


def test_bad_requests_get_4xx(server):
    r = server.post("/v1/predict", json={"task": "nope", "inputs": ["x"]})
    assert r.status_code == 404 and "unknown task 'nope'" in r.json()["detail"]
    assert server.post("/v1/predict", json={"task": "sst2"}).status_code == 422
    assert server.post("/v1/predict", json={"task": "sst2", "inputs": []}).status_code == 422
    r = server.post("/v1/predict", json={"task": "sst2", "inputs": [["a", "b", "c"]]})
    assert r.status_code == 422
    assert server.post("/v1/predict", content=b"{not json").status_code == 422
    assert server.delete("/v1/tasks/nope").status_code == 404


def test_concurrent_mixed_task_requests_match_single_task_answers(server, diffs):
    if "stsb" not in [t["name"] for t in server.get("/v1/tasks").json()]:
        server.post("/v1/tasks", json={"name": "stsb", "path": str(diffs / "stsb" / "diff")})
    texts = ["the film was great", "a dull and boring plot", "lovely fun movie", "poor weak it"]
    requests = [("sst2", [t]) for t in texts] + [("stsb", [[t, texts[0]]]) for t in texts]
    single = {}
    for task, inputs in requests:
        single[(task, str(inputs))] = server.post("/v1/predict", json={
            "task": task, "inputs": inputs}).json()["predictions"]

    def call(i):
        task, inputs = requests[i % len(requests)]
        out = server.post("/v1/predict", json={"task": task, "inputs": inputs}).json()
        return (task, str(inputs)), out["predictions"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(call, range(64)))
    for key, preds in results:
        assert preds == single[key], key
