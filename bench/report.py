"""The report of bench/compare.py: results.md (the paper's table layout, storage, cost), plots.

Reads the per-run records; every number in the report is computed from them here.
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from scipy.stats import t as t_dist

LABELS = {"full": "full finetuning", "magnitude": "magnitude (0.5%)", "bitfit": "BitFit",
          "lora": "LoRA (PEFT, ~0.5%)", "shira": "SHiRA (PEFT, ~0.5%)"}


def label(variant: str) -> str:
    if variant.startswith("diff-"):
        _, kind, density = variant.split("-")
        return f"diff pruning, {'structured' if kind == 's' else 'unstructured'} {100 * float(density):g}%"
    if variant.startswith("magnitude-"):
        return f"magnitude ({100 * float(variant.split('-')[1]):g}%)"
    return LABELS.get(variant, variant)


# Settings a score depends on, with the training stage that reads them (None: every method;
# recipe.plan gives a method's stages). A run trained with another value than today's default
# is marked in the table: its row predates a change of default and has not been retrained.
WATCHED = {"lr": "l0", "controller_warmup": "l0", "lr_fixmask": "fixed", "lr_head": None}


def earlier_defaults(rs: list[dict], fields: dict | None = None) -> dict[str, dict]:
    """{setting: {"values": [...], "now": default}} where these runs (one variant's) differ
    from today's TrainConfig defaults at their density (some defaults depend on it), with the
    variant's own settings (``fields``, compare.variant_config: BitFit's head rate) on top."""
    from diffprune.recipe import TrainConfig, plan
    out, now = {}, {}
    for r in rs:
        cfg = r.get("config") or {}
        default = TrainConfig(**{**({"density": cfg["density"]} if "density" in cfg else {}),
                                 **(fields or {})})
        stages = {phase.stage for phase in plan(TrainConfig(method=cfg.get("method", "diff")))}
        for key, stage in WATCHED.items():
            if key in cfg and (stage is None or stage in stages) \
                    and cfg[key] != getattr(default, key):
                out.setdefault(key, set()).add(cfg[key])
                now[key] = getattr(default, key)
    return {k: {"values": sorted(v), "now": now[k]} for k, v in out.items()}


def _mean(xs):
    return statistics.mean(xs) if xs else None


def aggregate(records: list[dict], tasks: tuple[str, ...], variant_fields=None) -> dict:
    """Per variant: mean score per task (over seeds), average, and per-task costs.
    ``variant_fields(variant)``: the TrainConfig fields the variant sets itself (None:
    none)."""
    by = defaultdict(list)
    for r in records:
        by[r["variant"]].append(r)
    rows = {}
    for variant, rs in by.items():
        per_task = {t: [r["score"] for r in rs if r["task"] == t] for t in tasks}
        means = {t: _mean(s) for t, s in per_task.items() if s}
        rows[variant] = {
            "scores": means, "sd": {t: statistics.stdev(s) for t, s in per_task.items()
                                    if len(s) > 1},
            "n": {t: len(s) for t, s in per_task.items()},
            "average": _mean(list(means.values())) if len(means) == len(tasks) else None,
            # share of the base outside the head (BitFit's gated set is the biases only)
            "pct_params": 100 * _mean([r["nnz"] / (r["total_params"] - r["dense_params"])
                                       for r in rs]),
            "stored_params": _mean([r["stored_params"] for r in rs]),
            "trainable_params": _mean([r["trainable_params"] for r in rs]),
            "bytes": _mean([r["artifact_bytes"] for r in rs]),
            "bits_per_nnz": _mean([8 * r["artifact_bytes"] / r["nnz"] for r in rs]),
            "position_bits": _mean([r["position_bits_per_nnz"] for r in rs
                                    if r.get("position_bits_per_nnz")]),
            "wall_time_s": _mean([r["wall_time_s"] for r in rs]),
            "peak_memory_bytes": _mean([r["peak_memory_bytes"] for r in rs]),
            "rank": rs[0].get("rank"),
            "earlier_defaults": earlier_defaults(rs, variant_fields and variant_fields(variant)),
            "l0": [{"task": r["task"], "seed": r["seed"], "l0_dev": r["phases"]["l0"]["dev"]["score"],
                    "l0_density": r["phases"]["l0"]["expected_density"],
                    "projection_dev": r["projection"]["dev"]["score"], "final": r["score"],
                    "by_delta": r["projection"].get("by_delta"),
                    "by_fill": r["projection"].get("by_fill")}
                   for r in rs if "l0" in (r.get("phases") or {})],
        }
    return rows


def paired(records: list[dict], tasks: tuple[str, ...], a: str, b: str) -> dict | None:
    """Variant ``a`` against ``b`` on the seeds both finished every task of: per seed, the
    difference of the averages over tasks (a - b); and over the matched task-seeds, how
    often a scored higher, the same, or lower. None when no seed is shared. The main table
    averages each method over its own seeds; this compares like with like."""
    score = {(r["variant"], r["task"], r["seed"]): r["score"] for r in records}
    seeds = sorted({s for (v, _, s) in score if v == a}
                   & {s for (v, _, s) in score if v == b})
    seeds = [s for s in seeds if all((v, t, s) in score for v in (a, b) for t in tasks)]
    if not seeds:
        return None
    per_seed = [_mean([score[a, t, s] - score[b, t, s] for t in tasks]) for s in seeds]
    pairs = [score[a, t, s] - score[b, t, s] for s in seeds for t in tasks]
    return {"seeds": seeds, "per_seed": per_seed, "mean": _mean(per_seed),
            "interval95": interval95(per_seed),
            "better": sum(d > 0 for d in pairs), "same": sum(d == 0 for d in pairs),
            "worse": sum(d < 0 for d in pairs)}


def interval95(xs: list[float]) -> list[float] | None:
    """The 95% confidence interval of the mean of ``xs`` (Student's t over the seeds, which
    are independent runs); None for fewer than two."""
    if len(xs) < 2:
        return None
    half = t_dist.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    m = statistics.mean(xs)
    return [m - half, m + half]


def _magnitude_at(variant: str) -> str:
    """The magnitude baseline at a diff-pruning variant's density."""
    density = variant.split("-")[2]
    return "magnitude" if float(density) == 0.005 else f"magnitude-{density}"


def pairings(records: list[dict], tasks: tuple[str, ...], variants) -> list[tuple]:
    """(a, b, paired(a, b)) for every variant against full finetuning, diff pruning also
    against LoRA, SHiRA and the magnitude mask at its density, and unstructured against
    structured at the same density; pairs without a shared seed are left out."""
    out = []
    for a in variants:
        against = ["full"] + (["lora", "shira", _magnitude_at(a)] if a.startswith("diff-")
                              else []) \
            + ([a.replace("diff-u-", "diff-s-")] if a.startswith("diff-u-") else [])
        for b in against:
            if a != b and b in variants:
                p = paired(records, tasks, a, b)
                if p is not None:
                    out.append((a, b, p))
    return out


def paired_table(records: list[dict], tasks: tuple[str, ...], order: list[str]) -> list[str]:
    lines = ["| method | against | seeds | average difference per seed | mean | 95% interval "
             "of the mean | task-seeds better / same / worse |", "|---|---|---|---|---|---|---|"]
    for a, b, p in pairings(records, tasks, order):
        ci = p["interval95"]
        lines.append(f"| {label(a)} | {label(b)} | {', '.join(map(str, p['seeds']))} | "
                     + ", ".join(f"{d:+.2f}" for d in p["per_seed"])
                     + f" | {p['mean']:+.2f} | "
                     + ("" if ci is None else f"{ci[0]:+.2f} to {ci[1]:+.2f}")
                     + f" | {p['better']} / {p['same']} / {p['worse']} |")
    return lines if len(lines) > 2 else []


def pct_stored(variant: str, row: dict) -> float:
    """% of the base a variant stores per task: full finetuning a whole checkpoint (as in the
    paper's table), the others their changed parameters."""
    return 100 if variant == "full" else row["pct_params"]


def _fmt(x, spec=".2f"):
    return "" if x is None else format(x, spec)


def tables(rows: dict, tasks: tuple[str, ...], ckpt_bytes: int,
           records: list[dict] = ()) -> list[str]:
    order = sorted(rows, key=lambda v: (v != "full", not v.startswith("diff-s"),
                                        not v.startswith("diff-u"), v))
    main = ["| method | seeds | % params per task | " + " | ".join(tasks)
            + " | average | bytes per task |", "|---" * (len(tasks) + 5) + "|"]
    for v in order:
        r = rows[v]
        pct, size = pct_stored(v, r), ckpt_bytes if v == "full" else r["bytes"]
        cells = [_fmt(r["scores"].get(t)) + (f" ± {r['sd'][t]:.2f}" if t in r["sd"] else "")
                 for t in tasks]
        counts = sorted({n for n in r["n"].values() if n})
        seeds = "-".join(str(c) for c in (counts[0], counts[-1])[:1 + (len(counts) > 1)])
        mark = " †" if r["earlier_defaults"] else ""
        main.append(f"| {label(v)}{mark} | {seeds} | {pct:.3g} | " + " | ".join(cells)
                    + f" | {_fmt(r['average'])} | {size / 1e3:,.0f} kB |")
    notes = [label(v) + ": " + ", ".join(f"{k} {'/'.join(map(str, e['values']))} (now {e['now']})"
                                         for k, e in rows[v]["earlier_defaults"].items())
             for v in order if rows[v]["earlier_defaults"]]
    if notes:
        main += ["", "† trained with an earlier default, not retrained since: " + "; ".join(notes)
                 + "."]
    storage = ["| method | stored parameters (incl. head) | bytes per task | bits per stored "
               "value (all files) | position bits per nonzero | x smaller than a checkpoint |",
               "|---|---|---|---|---|---|",
               f"| full checkpoint (safetensors) | | {ckpt_bytes / 1e3:,.0f} kB | | | 1 |"]
    for v in order:
        r = rows[v]
        name = "full finetuning, written as a sparse diff" if v == "full" else label(v)
        storage.append(f"| {name} | {r['stored_params']:,.0f} | {r['bytes'] / 1e3:,.0f} kB | "
                       f"{r['bits_per_nnz']:.1f} | {_fmt(r['position_bits'], '.2f')} | "
                       f"{ckpt_bytes / r['bytes']:,.0f} |")
    cost = ["| method | trainable parameters (largest phase) | wall time per run (s) | "
            "peak memory (MB) |", "|---|---|---|---|"]
    for v in order:
        r = rows[v]
        cost.append(f"| {label(v)} | {r['trainable_params']:,.0f} | {r['wall_time_s']:.0f} | "
                    f"{r['peak_memory_bytes'] / 2**20:,.0f} |")
    l0 = ["| variant | task | seed | E[density] end of L0 | dev after L0 | after projection | "
          "final | kept by delta / filled |", "|---|---|---|---|---|---|---|---|"]
    for v in order:
        for e in rows[v]["l0"]:
            l0.append(f"| {label(v)} | {e['task']} | {e['seed']} | {e['l0_density']:.5f} | "
                      f"{e['l0_dev']:.2f} | {e['projection_dev']:.2f} | {e['final']:.2f} | "
                      f"{e['by_delta']} / {e['by_fill']} |")
    pairs = paired_table(list(records), tasks, order)
    if pairs:
        pairs = ["## Paired on the same seeds", "",
                 "Each method against full finetuning (and diff pruning against LoRA, SHiRA "
                 "and the magnitude mask at its density, unstructured against structured) "
                 "on the seeds both finished every task of: the difference of the averages, "
                 "per seed and their mean, the 95% confidence interval of that mean "
                 "(Student's t over the seeds), and how many task-seeds scored higher, the "
                 "same, or lower.", "", *pairs, ""]
    return ["## Dev scores", "", *main, "", *pairs, "## Storage per task", "", *storage, "",
            "## Training cost (this machine)", "",
            "Wall time and peak resident memory of each run's process. The machine was not "
            "isolated: other jobs shared its 2 CPUs during some runs, so wall times are rough; "
            "`bench/train_cost.py` is the controlled step-cost comparison. Runs trained "
            "before commit f7fde6d (session 23) held the whole training state a second time "
            "while writing each checkpoint, which raised their peak memory (on MiniLM by about "
            "0.8 GB for diff pruning and 0.3 GB for full finetuning: bench/README.md, "
            "session 23).", "", *cost, "",
            "## The L0 phase of each diff-pruning run", "", *l0]


def seed_counts(rows: dict) -> dict[str, int]:
    """How many seeds each plotted point (a variant with an average) averages: the fewest of
    any of its tasks."""
    return {v: min(r["n"].values()) for v, r in rows.items() if r["average"] is not None}


def with_seeds(name: str, counts: list[int]) -> str:
    """A legend entry naming the seeds behind each of its points, in the order plotted:
    "LoRA, 5 seeds"; "diff pruning, 3/3/6/3 seeds" where they differ."""
    shown = str(counts[0]) if len(set(counts)) == 1 else "/".join(map(str, counts))
    return f"{name}, {shown} seed{'s' * (shown != '1')}"


def plot_scores(rows: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    # each point averages its own seeds; the legend says how many, so points resting on
    # fewer seeds than their neighbours are not read as like for like
    seeds = seed_counts(rows)
    for prefix, name, style in (("diff-s-", "diff pruning (structured)", "o-"),
                                ("diff-u-", "diff pruning (unstructured)", "s--"),
                                ("magnitude", "magnitude (not learned)", "v:")):
        pts = sorted((rows[v]["pct_params"], rows[v]["average"], seeds[v]) for v in seeds
                     if v.startswith(prefix))
        if pts:
            x, y, n = zip(*pts)
            ax.plot(x, y, style, label=with_seeds(name, list(n)))
    for v in ("full", "bitfit", "lora", "shira"):
        if v in seeds:
            ax.plot(pct_stored(v, rows[v]), rows[v]["average"], "^", markersize=8,
                    label=with_seeds(label(v), [seeds[v]]))
    ax.set_title("mean over each point's seeds (in the legend, by % stored)", fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("% of base parameters stored per task (log scale)")
    ax.set_ylabel("average dev score")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_nonzeros(records: list[dict], variant: str, path: Path) -> bool:
    """Where diff pruning put its nonzeros, summed over the tasks of one variant."""
    from diffprune import SparseDiff
    from diffprune.inspect_diff import plot, summary
    infos = [summary(SparseDiff.load(r["artifact"])) for r in records
             if r["variant"] == variant and Path(r["artifact"]).exists()]
    if not infos:
        return False
    merged = {"nnz": sum(i["nnz"] for i in infos),
              "gated_params": sum(i["gated_params"] for i in infos)}
    merged["density"] = merged["nnz"] / merged["gated_params"]
    for key in ("per_layer", "per_component"):
        table = defaultdict(lambda: [0, 0])
        for i in infos:
            for k, v in i[key].items():
                table[k][0] += v["nnz"]
                table[k][1] += v["params"]
        merged[key] = {k: {"density": n / p} for k, (n, p) in table.items()}
    plot(merged, str(path))
    return True


def with_command(commands: list[str], command: str | None) -> list[str]:
    """The commands that trained the runs, in the order they last ran: a command run again
    (say, after its variant's old runs were moved aside to retrain it) moves to the end.
    None (``--report-only``, which trains nothing) leaves the list as it is."""
    if command is None:
        return list(commands)
    return [c for c in commands if c != command] + [command]


def reported_tasks(tasks: tuple[str, ...], records: list[dict]) -> tuple[str, ...]:
    """The profile's tasks that have runs here, in its order (all of them where none has): a
    study of some tasks (``--tasks``) gets its own columns, their average and the paired
    table, instead of empty columns and no average."""
    have = {r["task"] for r in records}
    return tuple(t for t in tasks if t in have) or tuple(tasks)


def subset_text(tasks: tuple[str, ...], of_tasks: tuple[str, ...] | None) -> str:
    """The header's sentence for a report of fewer tasks than its profile's ('' otherwise)."""
    if not of_tasks or len(tasks) == len(of_tasks):
        return ""
    return (f"Only {len(tasks)} of the profile's {len(of_tasks)} tasks have runs here "
            f"({', '.join(tasks)}): the average is theirs, not that of {', '.join(of_tasks)}. ")


def training_text(records: list[dict], profile) -> str:
    """The header's account of the training sets and epochs, read from the runs' own
    settings (a ``--set`` may have changed the profile's), the profile's where no run has
    them."""
    sizes = {r["config"].get("max_train_samples") for r in records} or \
        {profile.max_train_samples}
    train = " and ".join("full training sets" if n is None else
                         f"{n:,} seeded training examples per task"
                         for n in sorted(sizes, key=lambda n: (n is None, n or 0)))
    two = sorted({(r["config"]["epochs"], r["config"]["fixmask_epochs"]) for r in records
                  if r["config"]["method"] in ("diff", "magnitude")}) or \
        [(profile.epochs, profile.fixmask_epochs)]
    one = sorted({r["config"]["epochs"] for r in records
                  if r["config"]["method"] not in ("diff", "magnitude")}) or [profile.single]
    same = {a + b for a, b in two} == set(one)
    return (f"{train}; max length 128; the `seeds` column gives how many seeds each score "
            "averages (mean ± sd where more than one); diff pruning and magnitude "
            f"{' or '.join(f'{a} + {b}' for a, b in two)} epochs, the single-phase methods "
            f"(full, BitFit, LoRA, SHiRA) {' or '.join(map(str, one))} epochs"
            + (", so every method takes the same number of steps" if same else
               " (the paper's epochs: diff pruning takes twice the steps)"
               if profile.single_epochs else ""))


def write_report(out: Path, records: list[dict], tasks: tuple[str, ...], profile,
                 command: str | None, ckpt_bytes: int, variant_fields=None) -> None:
    """``tasks``: the profile's; the columns are those with runs here (``reported_tasks``),
    and the header says so when they are fewer (``subset_text``)."""
    tasks, of_tasks = reported_tasks(tasks, records), tasks
    rows = aggregate(records, tasks, variant_fields)
    old = out / "results.json"  # the commands that trained these runs, oldest first
    prev = json.loads(old.read_text()) if old.exists() else {}
    commands = with_command(prev.get("commands") or
                            ([prev["command"]] if "command" in prev else []), command)
    pairs = [{"method": a, "against": b, **p} for a, b, p in pairings(records, tasks, rows)]
    summary = {"commands": commands, "tasks": list(tasks), "full_checkpoint_bytes": ckpt_bytes,
               "methods": rows, "paired": pairs}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    if rows:
        plot_scores(rows, out / "score_vs_params.png")
    structured = sorted({r["variant"] for r in records if r["variant"].startswith("diff-s-")},
                        key=lambda v: abs(float(v.split("-")[2]) - 0.005))
    drawn = bool(structured) and plot_nonzeros(records, structured[0], out / "nonzeros.png")
    # the diffs live under tmp/ (not committed): a fresh checkout keeps the committed figure
    kept = bool(structured) and not drawn and (out / "nonzeros.png").exists()
    text = ["# diffprune vs full finetuning, BitFit, LoRA and SHiRA (issue 4)", "",
            "Commands (in the order they last ran; a later one adds runs, finished ones are "
            "kept):",
            "", *[f"- `{c}`" for c in commands], "",
            f"Model: `{records[0]['config']['model'] if records else profile.model}`; "
            f"{training_text(records, profile)}. {subset_text(tasks, of_tasks)}"
            "Scores: each task's official dev "
            "metric (mean of its metrics), percent. `% params per task`: parameters a task "
            "stores beyond the base, as a share of the base (the dense task head, the same "
            "for every method, is stored too and counted in the byte columns). Runs trained "
            "since commit 1f3b4f8 (session 11) train in train mode, as `transformers`' "
            "Trainer does (dropout on, diff pruning's gates sampled); earlier runs trained in "
            "eval mode (bench/README.md, session 11).", "",
            *tables(rows, tasks, ckpt_bytes, records), "",
            "![average score vs parameters](score_vs_params.png)", ""]
    if drawn or kept:
        text += [f"Where {label(structured[0])} puts its nonzeros, summed over the tasks "
                 "(share of each layer's and each component's parameters changed)"
                 + (": the figure as an earlier run of this report drew it; the diffs it "
                    "reads (under tmp/, not committed) are not on this machine" if kept
                    else "") + ":", "",
                 "![nonzeros per layer and component](nonzeros.png)", ""]
    (out / "results.md").write_text("\n".join(text))
    print("\n".join(text))
