"""An HTTP JSON service: one base model in memory, many task diffs, predictions per task.

  POST   /v1/predict        {"task": "sst2", "inputs": ["text", ["text", "pair"], ...]}
  GET    /v1/tasks          the loaded tasks (labels, nonzeros, bytes)
  POST   /v1/tasks          {"name": "rte", "path": "runs/rte/diff"}: add a task at run time
  DELETE /v1/tasks/{name}   drop a task
  GET    /health

Requests run one at a time on the model (a lock around switch + forward), so concurrent
requests for different tasks never see each other's weights; switching costs the size of a
diff, not of the model. A diff that fails to load or to match the base is refused with 400
and the tasks already served are untouched.
"""
from __future__ import annotations

import threading

import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from .bank import DiffBank
from .errors import DiffPruneError
from .hf import load_model
from .sparse_diff import SparseDiff
from .data.batches import collate, predictions, tokenize

MAX_INPUTS = 256


class PredictRequest(BaseModel):
    task: str
    inputs: list[str | list[str]] = Field(min_length=1, max_length=MAX_INPUTS)


class AddTaskRequest(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    path: str


class Service:
    """The model, its tokenizer and the bank, with one lock around everything that runs."""

    def __init__(self, base: str, diffs: dict[str, str], max_length: int = 128):
        if not diffs:
            raise DiffPruneError("give at least one --diff NAME=DIR")
        first = SparseDiff.load(next(iter(diffs.values())))
        model, self.tokenizer = load_model(base or first.base_model, first.metadata["head"])
        self.bank = DiffBank(model.eval())
        self.max_length = max_length
        self.lock = threading.Lock()
        for name, path in diffs.items():
            self.add(name, path)

    def add(self, name: str, path: str) -> None:
        diff = SparseDiff.load(path)  # parse outside the lock: a bad file costs nobody
        if "head" not in diff.metadata:
            raise DiffPruneError(f"{path} has no task-head metadata (not made by diffprune)")
        with self.lock:
            self.bank.add(name, diff)

    def drop(self, name: str) -> None:
        with self.lock:
            self.bank.drop(name)

    def tasks(self) -> list[dict]:
        with self.lock:
            return [{"name": n, "task": d.metadata.get("task"), "labels": d.metadata.get("labels"),
                     "nnz": d.nnz, "density": d.density, "base_model": d.base_model}
                    for n, d in sorted(self.bank.diffs.items())]

    def predict(self, task: str, inputs: list) -> list[dict]:
        rows = []
        for x in inputs:
            pair = isinstance(x, list)
            if pair and len(x) != 2:
                raise ValueError("each input is a text or a [text, text_pair] list of two")
            rows.append({"text": x[0] if pair else x, "text_pair": x[1] if pair else None,
                         "label": 0})
        if any(r["text_pair"] is not None for r in rows):  # a mixed request: pair every row
            for r in rows:
                r["text_pair"] = r["text_pair"] or ""
        items = tokenize(self.tokenizer, rows, self.max_length)
        with self.lock:
            diff = self.bank.diffs.get(task)
            if diff is None:
                raise KeyError(task)
            self.bank.activate(task)
            batch = collate(self.tokenizer, items, next(self.bank.model.parameters()).device)
            batch.pop("labels")
            with torch.no_grad():
                logits = self.bank.model(**batch).logits
        return predictions(logits, diff.metadata.get("labels"))


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="diffprune", description="Many task diffs on one base model")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "tasks": len(service.bank.diffs)}

    @app.get("/v1/tasks")
    def tasks() -> list[dict]:
        return service.tasks()

    @app.post("/v1/tasks", status_code=201)
    def add_task(req: AddTaskRequest) -> dict:
        try:
            service.add(req.name, req.path)
        except DiffPruneError as exc:
            raise HTTPException(400, f"task {req.name!r} refused: {exc}") from None
        return {"added": req.name}

    @app.delete("/v1/tasks/{name}")
    def drop_task(name: str) -> dict:
        try:
            service.drop(name)
        except DiffPruneError as exc:
            raise HTTPException(404, str(exc)) from None
        return {"dropped": name}

    @app.post("/v1/predict")
    def predict(req: PredictRequest) -> dict:
        try:
            return {"task": req.task, "predictions": service.predict(req.task, req.inputs)}
        except KeyError:
            raise HTTPException(404, f"unknown task {req.task!r}; loaded: "
                                     f"{sorted(service.bank.diffs)}") from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    return app
