"""DiffBank: one shared base model, many task diffs; exact switching and mixed-task batches.

The setting diff pruning exists for (Guo, Rush & Kim 2021, Sec. 1): many tasks served from one
pretrained model. Memory grows by each diff's size, not the model's.

- ``activate(task)`` applies one task's diff and head in place (restore is bit-exact).
- ``forward_mixed(tasks, **batch)`` runs a batch whose rows belong to different tasks without
  touching any weight: every module whose parameters a diff changes gets a forward hook that
  adds, for the rows of each task, that task's sparse contribution (x @ dW^T for linear maps,
  dE[ids] for embeddings, dgamma * x_hat + dbeta for layer norms); each task's own head is
  applied to its rows. Because no weight changes, concurrent callers cannot see each other's
  weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DiffPruneError
from .inject import unwrap
from .sparse_diff import SparseDiff, _owner, with_delta

_CONV1D = ("Conv1D",)  # transformers.pytorch_utils.Conv1D: weight stored (in, out)


@dataclass
class _Switch:
    """Precomputed for one task: what to write where (both directions), so that a switch is
    one scatter_ per packed buffer (one in a float32 model) and per direction."""

    writes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    # (packed buffer, flat positions in it, base values, task values), all (nnz,) but the buffer
    heads: list[tuple[nn.Module, str, nn.Parameter]]  # (module, attr, task head Parameter)


@dataclass
class _ModuleDelta:
    """One task's change to one module, in the form its hook needs."""

    weight: torch.Tensor | None = None  # sparse (out, in) for linear maps; sparse (num, dim) emb.
    bias: torch.Tensor | None = None  # dense (out,)


class DiffBank:
    """A base model plus named task diffs."""

    def __init__(self, model: nn.Module):
        self.model = unwrap(model)
        self.diffs: dict[str, SparseDiff] = {}
        self.active: str | None = None
        self._deltas: dict[str, dict[str, _ModuleDelta]] = {}
        self._in_head = False
        self._batch = 0
        self._switch: dict[str, _Switch] = {}
        self._base_heads: list[tuple[nn.Module, str, nn.Parameter]] = []
        self._packed = _pack(self.model)

    # --- registry -----------------------------------------------------------------------
    def add(self, name: str, diff: SparseDiff | str | os.PathLike, force: bool = False) -> None:
        """Load (if a path), check against the base and register a diff. A diff that fails
        leaves the bank as it was; an existing task of the same name is replaced."""
        if not isinstance(diff, SparseDiff):
            diff = SparseDiff.load(Path(diff))
        active = self.active
        self.deactivate()  # the fingerprint and the precomputed values are of the pristine base
        try:
            if not force:
                diff.check_base(self.model, swap_heads=True)
            deltas, switch = self._module_deltas(diff), self._precompute(diff)
        finally:
            if active is not None and active != name:
                self.activate(active)
        self.diffs[name], self._deltas[name], self._switch[name] = diff, deltas, switch
        if active == name:
            self.activate(name)

    def drop(self, name: str) -> None:
        self._require(name)
        if self.active == name:
            self.deactivate()
        del self.diffs[name], self._deltas[name], self._switch[name]

    def tasks(self) -> list[str]:
        return sorted(self.diffs)

    def nbytes(self) -> int:
        """Memory held per loaded task: the diff (indices, values, heads) plus the precomputed
        switch values (base and task values at the diff's positions)."""
        total = 0
        for name, d in self.diffs.items():
            total += sum(t.indices.nbytes + t.values.nbytes for t in d.tensors)
            total += sum(v.nbytes for v in d.dense.values())
            total += sum(b.nbytes + t.nbytes for _, _, b, t in self._switch[name].writes)
            total += sum(h.nbytes for _, _, h in self._switch[name].heads)
        return total

    def _require(self, name: str) -> SparseDiff:
        if name not in self.diffs:
            raise DiffPruneError(f"unknown task {name!r}; loaded tasks: {self.tasks()}")
        return self.diffs[name]

    # --- one task at a time -------------------------------------------------------------
    @torch.no_grad()
    def _precompute(self, diff: SparseDiff) -> _Switch:
        """Base and task values at the diff's positions (taken while the base is pristine:
        add() deactivates first). Task values are computed as SparseDiff.apply_ does."""
        per_buffer: dict[int, list] = {}
        for t in diff.tensors:
            if not t.indices.numel():
                continue
            buffer, offset = self._packed[id(self.model.get_parameter(t.name))]
            idx = t.indices.to(buffer.device) + offset
            base = buffer.index_select(0, idx)
            entry = per_buffer.setdefault(id(buffer), [buffer, [], [], []])
            for part, value in zip(entry[1:], (idx, base, with_delta(base, t.values))):
                part.append(value)
        writes = [(buf, torch.cat(i), torch.cat(b), torch.cat(v))
                  for buf, i, b, v in per_buffer.values()]
        heads = []
        for n, v in diff.dense.items():
            module, attr = _owner(self.model, n)
            old = module._parameters[attr]
            heads.append((module, attr, nn.Parameter(v.to(old.device, old.dtype).clone(),
                                                     requires_grad=False)))
        return _Switch(writes, heads)

    @torch.no_grad()
    def activate(self, name: str) -> None:
        """Make ``name`` the model's task: one scatter_ per touched tensor, head swapped."""
        self._require(name)
        if self.active == name:
            return
        self.deactivate()
        switch = self._switch[name]
        self._base_heads = [(m, a, m._parameters[a]) for m, a, _ in switch.heads]
        for flat, idx, _, task in switch.writes:
            flat.scatter_(0, idx, task)
        for module, attr, head in switch.heads:
            module._parameters[attr] = head
        self.active = name

    @torch.no_grad()
    def deactivate(self) -> None:
        """Back to the base, bit for bit (the saved base values are written back)."""
        if self.active is None:
            return
        for flat, idx, base, _ in self._switch[self.active].writes:
            flat.scatter_(0, idx, base)
        for module, attr, head in self._base_heads:
            module._parameters[attr] = head
        self._base_heads = []
        self.active = None

    # --- mixed-task batches ---------------------------------------------------------------
    def _module_deltas(self, diff: SparseDiff) -> dict[str, _ModuleDelta]:
        out: dict[str, _ModuleDelta] = {}
        for t in diff.tensors:
            if t.indices.numel() == 0:
                continue
            prefix, _, attr = t.name.rpartition(".")
            module = self.model.get_submodule(prefix)
            kind = type(module).__name__
            if not isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)) and \
                    kind not in _CONV1D:
                raise DiffPruneError(f"mixed-task batches do not support {kind} ({t.name}); "
                                     "use activate() for this model")
            entry = out.setdefault(prefix, _ModuleDelta())
            dense_shape = t.shape
            values = t.values.float()
            if attr == "bias" or isinstance(module, nn.LayerNorm):
                vec = torch.zeros(t.numel).index_put_((t.indices,), values).view(dense_shape)
                if attr == "bias":
                    entry.bias = vec
                else:
                    entry.weight = vec
                continue
            rows, cols = t.indices // dense_shape[1], t.indices % dense_shape[1]
            if kind in _CONV1D:  # (in, out) -> (out, in)
                rows, cols, dense_shape = cols, rows, (dense_shape[1], dense_shape[0])
            entry.weight = torch.sparse_coo_tensor(torch.stack([rows, cols]), values,
                                                   dense_shape, check_invariants=True).coalesce()
        return out

    def _hook(self, prefix: str, rows: dict[str, torch.Tensor]):
        def hook(module, args, output):
            x = args[0]
            if output.shape[0] == 1 and self._batch > 1:
                # computed once and broadcast (e.g. position embeddings): give each row its own
                x = x.expand(self._batch, *x.shape[1:])
                output = output.expand(self._batch, *output.shape[1:])
            out = output.clone()
            for task, r in rows.items():
                delta = self._deltas[task].get(prefix)
                if delta is None:
                    continue
                out[r] = out[r] + _contribution(module, delta, x[r]).to(out.dtype)
            return out
        return hook

    def _head_hook(self, head_prefix: str, rows: dict[str, torch.Tensor]):
        def hook(module, args, kwargs, output):
            if self._in_head:
                return output
            pieces = {}
            self._in_head = True
            try:
                for task, r in rows.items():
                    params = {n[len(head_prefix) + 1:]: v.to(output.device) for n, v in
                              self.diffs[task].dense.items()}
                    sub_args = tuple(a[r] if torch.is_tensor(a) else a for a in args)
                    pieces[task] = torch.func.functional_call(module, params, sub_args, kwargs)
            finally:
                self._in_head = False
            width = max(p.shape[-1] for p in pieces.values())
            out = output.new_zeros(*output.shape[:-1], width)
            for task, r in rows.items():
                out[r, ..., :pieces[task].shape[-1]] = pieces[task]
            return out
        return hook

    @torch.no_grad()
    def forward_mixed(self, tasks: list[str], **inputs) -> list[torch.Tensor]:
        """Logits per row, each row through its own task's diff and head (no weight changes).

        ``tasks[i]`` names the task of row i; returns one logits vector per row (lengths may
        differ between tasks)."""
        for name in set(tasks):
            self._require(name)
        self.deactivate()
        device = next(self.model.parameters()).device
        self._batch = len(tasks)
        rows = {t: torch.tensor([i for i, x in enumerate(tasks) if x == t], device=device)
                for t in dict.fromkeys(tasks)}
        handles = []
        try:
            for prefix in {p for t in rows for p in self._deltas[t]}:
                module = self.model.get_submodule(prefix)
                handles.append(module.register_forward_hook(self._hook(prefix, rows)))
            head = _head_prefix([self.diffs[t] for t in rows])
            if head is not None:
                handles.append(self.model.get_submodule(head).register_forward_hook(
                    self._head_hook(head, rows), with_kwargs=True))
            logits = self.model(**inputs).logits
        finally:
            for h in handles:
                h.remove()
        widths = {t: _head_width(self.diffs[t], logits.shape[-1]) for t in rows}
        return [logits[i, :widths[t]] for i, t in enumerate(tasks)]


def _pack(model: nn.Module) -> dict[int, tuple[torch.Tensor, int]]:
    """Move every parameter into one flat buffer per (dtype, device) and make the parameters
    views of it, so that a task switch is a single scatter_ instead of one per tensor.
    Returns id(parameter) -> (buffer, offset of its first element)."""
    groups: dict[tuple, list[nn.Parameter]] = {}
    for p in model.parameters():  # each tied parameter once
        groups.setdefault((p.dtype, p.device), []).append(p)
    out = {}
    with torch.no_grad():
        for params in groups.values():
            buffer = torch.cat([p.detach().reshape(-1) for p in params])  # (sum of numels,)
            offset = 0
            for p in params:
                p.data = buffer[offset:offset + p.numel()].view_as(p)
                out[id(p)] = (buffer, offset)
                offset += p.numel()
    return out


def _contribution(module: nn.Module, delta: _ModuleDelta, x: torch.Tensor) -> torch.Tensor:
    """What the task's diff adds to this module's output for inputs x (one task's rows)."""
    if isinstance(module, nn.Embedding):
        ids = x.reshape(-1)
        rows = delta.weight.index_select(0, ids).to_dense()  # (n, dim)
        return rows.view(*x.shape, -1)
    if isinstance(module, nn.LayerNorm):
        x_hat = F.layer_norm(x.float(), module.normalized_shape, None, None, module.eps)
        add = torch.zeros_like(x_hat)
        if delta.weight is not None:
            add = add + x_hat * delta.weight
        return add + (delta.bias if delta.bias is not None else 0.0)
    flat = x.reshape(-1, x.shape[-1]).float()  # (n, in)
    add = torch.zeros(flat.shape[0], _out_features(module), device=x.device)
    if delta.weight is not None:
        add = torch.sparse.mm(delta.weight, flat.T).T  # (n, out)
    if delta.bias is not None:
        add = add + delta.bias
    return add.view(*x.shape[:-1], -1)


def _out_features(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.weight.shape[1]


def _head_prefix(diffs: list[SparseDiff]) -> str | None:
    names = {n for d in diffs for n in d.dense}
    if not names:
        return None
    prefixes = {n.split(".")[0] for n in names}
    if len(prefixes) != 1:
        raise DiffPruneError(f"task heads live in several modules {sorted(prefixes)}")
    return prefixes.pop()


def _head_width(diff: SparseDiff, default: int) -> int:
    head = diff.metadata.get("head", {})
    if "num_labels" in head:
        return int(head["num_labels"])
    outs = [v.shape[0] for n, v in diff.dense.items() if n.endswith("bias")]
    return outs[-1] if outs else default
