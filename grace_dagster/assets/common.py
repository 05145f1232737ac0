"""What the experiment assets share: partition keys, trial loading, progress, provenance."""

import getpass
import hashlib
import inspect
import os
import sys
import time
from dataclasses import dataclass

import pandas as pd
from dagster import AssetDep, AssetExecutionContext, MultiToSingleDimensionPartitionMapping
from tqdm import tqdm

from grace_dagster.assets.inputs import study_trials
from grace_dagster.registry import Model
from grace_dagster.resources import Storage
from grace_dagster.resources.settings import ExperimentSettings
from grace_dagster.studies import STUDIES, Study

# Steps that talk to a model share this pool; the instance config (dagster.yaml, Helm values) sets its limit.
ENDPOINT_POOL = "llm-endpoints"

# Each model × study partition reads the study's partition of the validated inputs.
TRIALS_DEP = AssetDep(study_trials, partition_mapping=MultiToSingleDimensionPartitionMapping("study"))


def code_version(*modules) -> str:
    """Changes whenever the studies' prompts or the given modules change, so the UI marks outputs stale."""
    study_modules = {inspect.getmodule(s.exp1_prompts) for s in STUDIES.values()}
    digest = hashlib.sha256()
    for module in sorted(study_modules | set(modules), key=lambda m: m.__name__):
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class Partition:
    model: str
    study: Study

    @property
    def label(self) -> str:
        return f"{self.model}|{self.study.name}"


def run_tags(model: str | None = None, study: str | None = None) -> dict[str, str]:
    """The tags every run the project launches carries: the instance's run queue limits runs per model and per user
    with them (dagster.yaml), and GPU admission counts a user's runs by them."""
    tags = {"grace/user": os.environ.get("GRACE_USER") or getpass.getuser()}
    if model:
        tags["grace/model"] = model
    if study:
        tags["grace/study"] = study
    return tags


def partition(context: AssetExecutionContext) -> Partition:
    keys = context.partition_key.keys_by_dimension
    return Partition(keys["model"], STUDIES[keys["study"]])


def load_trials(storage: Storage, settings: ExperimentSettings, study: Study) -> pd.DataFrame:
    return settings.subset(storage.read_table(storage.trials_path(study)))


def trial_seed(base: int, trial_id: str) -> int:
    """A seed per trial, so a trial's answer does not depend on which other trials ran or in what order."""
    return (base + int(hashlib.sha256(trial_id.encode()).hexdigest()[:8], 16)) % 2**31


def digest(items: list) -> str:
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


class Progress:
    """Progress of a long batch: Dagster log lines every 10% or 30 s, and a bar when a person watches a terminal."""

    def __init__(self, context: AssetExecutionContext, label: str):
        self.context = context
        self.label = label
        self.start = time.monotonic()
        self.last_log = 0.0
        self.last_decile = -1
        self.first_done: int | None = None
        self.bar: tqdm | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.first_done is None:
            self.first_done = done
            if sys.stderr.isatty():
                self.bar = tqdm(total=total, initial=done, desc=self.label, unit="req")
        elif self.bar is not None:
            self.bar.update(done - self.bar.n)
        now = time.monotonic()
        decile = done * 10 // max(total, 1)
        if decile != self.last_decile or now - self.last_log > 30 or done == total:
            elapsed = now - self.start
            rate = (done - self.first_done) / elapsed if elapsed > 0 else 0.0
            eta = f", about {(total - done) / rate / 60:.1f} min left" if rate > 0 and done < total else ""
            self.context.log.info(f"{self.label}: {done}/{total} done ({done / max(total, 1):.0%}), {rate:.2f}/s{eta}")
            self.last_log, self.last_decile = now, decile
        if done == total and self.bar is not None:
            self.bar.close()


def model_provenance(model: Model, server_version: str, weights_sha256: str | None) -> dict:
    return {
        "model": model.slug,
        "served_name": model.served_name,
        "model_kind": model.kind,
        "weights": model.weights_revision,
        "weights_sha256": weights_sha256 or "n/a (served remotely)",
        "server_version": server_version,
    }
