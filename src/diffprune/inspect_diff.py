"""Where a diff puts its nonzeros: per tensor, per layer and per component, and a plot.

Mirrors the analysis of Guo, Rush & Kim 2021 (Sec. 6, Fig. 2): which layers and which parts of
a transformer (embeddings, attention q/k/v/o, feed-forward, layer norms, biases) change.
"""
from __future__ import annotations

import re
from collections import defaultdict

from .sparse_diff import SparseDiff

_LAYER = re.compile(r"\.(?:layer|layers|h|block)\.(\d+)\.")
# MPNet's relative_attention_bias is an embedding table of relative positions
_EMBED = r"embed|\.wte\.|\.wpe\.|relative_attention_bias"
_COMPONENTS = [  # first match wins; checked on the lower-cased name
    ("layer_norm", r"layernorm|layer_norm|\.ln_|\.norm"),
    ("bias", r"\.bias$"),
    ("embeddings", _EMBED),
    ("attn_q", r"\.(query|q_proj|q)\."),
    ("attn_k", r"\.(key|k_proj|k)\."),
    ("attn_v", r"\.(value|v_proj|v)\."),
    ("attn_qkv", r"c_attn"),
    ("attn_o", r"attention\.output\.dense|attn\.c_proj|\.o_proj\.|(attention|attn)\.o\."),
    ("ffn", r"intermediate|output\.dense|mlp|\.fc"),
    ("pooler", r"pooler"),
]


def component(name: str) -> str:
    low = name.lower()
    for label, pattern in _COMPONENTS:
        if re.search(pattern, low):
            return label
    return "other"


def layer(name: str) -> str:
    m = _LAYER.search(name)
    if m:
        return m.group(1)
    low = name.lower()
    if re.search(_EMBED, low):
        return "embeddings"
    return "pooler" if "pooler" in low else "other"


def summary(diff: SparseDiff) -> dict:
    """Counts per tensor, per layer and per component, with densities."""
    per_layer: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    per_comp: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    tensors = []
    for t in diff.tensors:
        nnz = int(t.indices.numel())
        tensors.append({"name": t.name, "shape": list(t.shape), "nnz": nnz,
                        "density": nnz / t.numel})
        for table, key in ((per_layer, layer(t.name)), (per_comp, component(t.name))):
            table[key][0] += nnz
            table[key][1] += t.numel

    def table(d):
        return {k: {"nnz": v[0], "params": v[1], "density": v[0] / v[1],
                    "share_of_nnz": v[0] / max(1, diff.nnz)} for k, v in d.items()}
    return {"base_model": diff.base_model, "base_fingerprint": diff.base_fingerprint,
            "nnz": diff.nnz, "gated_params": diff.numel, "density": diff.density,
            "dense_params": sum(v.numel() for v in diff.dense.values()),
            "position_bits_per_nnz": diff.position_bits(), "values_dtype": diff.values_dtype,
            "per_layer": table(per_layer), "per_component": table(per_comp), "tensors": tensors,
            "metadata": diff.metadata}


def plot(info: dict, path: str) -> None:
    """Two bar charts: density per layer and per component."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, title in ((axes[0], "per_layer", "by layer"),
                           (axes[1], "per_component", "by component")):
        items = sorted(info[key].items(), key=lambda kv: (not kv[0].isdigit(),
                                                          int(kv[0]) if kv[0].isdigit() else 0,
                                                          kv[0]))
        ax.bar([k for k, _ in items], [100 * v["density"] for _, v in items], color="#3b6ea8")
        ax.set_title(f"nonzeros {title}")
        ax.set_ylabel("% of parameters changed")
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(f"diff: {info['nnz']:,} nonzeros ({100 * info['density']:.3f}% of "
                 f"{info['gated_params']:,})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
