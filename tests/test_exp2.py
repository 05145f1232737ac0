"""Experiment 2 probabilities: the asset's distributions against brute-force llama.cpp scoring, and the blocking
checks stopping corrupted tables before anything downstream uses them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from dagster import AssetKey, AssetSelection, DagsterInstance, asset, materialize
from llama_cpp._internals import LlamaBatch
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from grace_dagster.assets import ALL_ASSETS, ALL_CHECKS, exp2_probabilities
from grace_dagster.assets.checks import CheckContext
from grace_dagster.assets.exp2 import (
    captured_mass_reported,
    every_trial_and_question_scored,
    options_of,
    probabilities_sum_to_one,
    probabilities_within_unit_interval,
    summaries,
)
from grace_dagster.assets.partitions import model_study_partitions
from grace_dagster.llm.prompting import plain_text
from grace_dagster.llm.scoring import AnswerScores, OptionScores
from grace_dagster.registry import load_registry
from grace_dagster.resources import ExperimentSettings
from grace_dagster.serving.engine import N_UBATCH, evaluation_cuts, load_without_weight_repacking
from grace_dagster.serving.weights import gguf_path
from grace_dagster.studies import STUDIES
from grace_dagster.studies.base import Question
from tests import pipeline

CHATML_END_OF_TURN = "<|im_end|>\n"


class BruteForce:
    """Each option with its full context evaluated alone from an empty cache, nothing shared between options, in the
    ubatches of a lone evaluation (the engine's rule, `evaluation_cuts`). Otherwise written against
    llama-cpp-python's low-level API independently of the server's engine. Only the logits rows it reads are computed
    (a row of Gemma's 262k vocabulary costs more than the token's evaluation), as the server computes only the rows
    a request asks for; a row's numbers do not depend on which other rows are computed."""

    def __init__(self, slug: str):
        model = load_registry().get(slug)
        self.kind = model.kind
        self.llm = load_without_weight_repacking(
            model_path=str(gguf_path(model)),
            n_ctx=model.serving.context_length,
            n_batch=512,
            n_ubatch=N_UBATCH,
            verbose=False,
        )
        self.batch = LlamaBatch(n_tokens=512, embd=0, n_seq_max=1)
        self.n_vocab = self.llm.n_vocab()
        template = self.llm.metadata.get("tokenizer.chat_template")
        self.chat = (
            Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|im_start|>") if template else None
        )

    def context_and_forms(self, question: Question) -> tuple[str, list[list[str]], bool]:
        """The context, each option's surface forms as continuations, and whether to add BOS."""
        if self.kind == "instruct":
            # An independent rendering: llama-cpp-python's own Jinja formatter, ChatML's own end-of-turn.
            context = self.chat(messages=question.messages).prompt
            return context, [[f + CHATML_END_OF_TURN for f in forms] for forms in question.variants], False
        return plain_text(question.messages), [[f" {f}\n" for f in forms] for forms in question.variants], True

    def logprob(self, context: str, option: str, add_bos: bool) -> float:
        context_ids = self.llm.tokenize(context.encode(), add_bos=add_bos, special=True)
        full = self.llm.tokenize((context + option).encode(), add_bos=add_bos, special=True)
        assert full[: len(context_ids)] == context_ids, "the option starts on a token boundary"
        self.llm._ctx.kv_cache_clear()
        total, start = 0.0, 0
        for end in evaluation_cuts(full, self.llm._model.vocab, N_UBATCH):
            read = range(max(start, len(context_ids) - 1), end - 1 if end == len(full) else end)
            self.batch.set_batch(full[start:end], start, False)
            for i in read:  # the rows read (and each ubatch's last, set above), as the server's scoring requests
                self.batch.batch.logits[i - start] = True
            self.llm._ctx.decode(self.batch)
            for i in read:
                row = self.llm._ctx.get_logits_ith(i - start)
                row = np.ctypeslib.as_array(row, shape=(self.n_vocab,)).astype(np.float64)
                peak = row.max()
                total += row[full[i + 1]] - (peak + math.log(np.exp(row - peak).sum()))
            start = end
        return total

    def distribution(self, question: Question) -> np.ndarray:
        """Each option's probability: its forms' probabilities summed, renormalized over the options."""
        context, forms, add_bos = self.context_and_forms(question)
        mass = np.array([sum(math.exp(self.logprob(context, f, add_bos)) for f in option) for option in forms])
        return mass / mass.sum()


def _total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p - q).sum())


@pytest.mark.slow
@pytest.mark.parametrize(
    "slug,study_name,n_trials",
    [("smollm2-135m", "study1", 12), ("gemma3-270m", "study2", 20)],
    ids=["smollm2-chat-no-bos-digit-options-study1", "gemma-base-bos-study2"],
)
def test_asset_distributions_match_brute_force_llama_cpp(tmp_path, servers, slug, study_name, n_trials):
    """The first trials of each study: study 1's 12 hold every (access, observed) condition twice (the quick
    profile's subset), study 2's 20 every goal × state cell. The brute force evaluates every form of every option with
    its full context from an empty cache, configured like the server (the same ubatches: "computed the same way");
    the asset shares each question's context across its options. Their total variation is the engine's batch-split
    noise on the shared path, which sharing only whole ubatches makes zero; it is measured and reported. The brute
    force covers one question per trial, a state question (study 1: 11 options, digits split into tokens) every
    fourth trial and the last question otherwise, to stay within the test budget."""
    server = servers(slug)
    instance = DagsterInstance.ephemeral()
    res = pipeline.resources(tmp_path, trial_limit=n_trials, base_urls={slug: server.base_url})
    pipeline.prepare(instance, res, [slug], studies=(study_name,))
    result = pipeline.run(instance, res, exp2_probabilities.key, slug, study_name)
    assert result.success
    table = pd.read_parquet(tmp_path / "data" / "exp2" / "probabilities" / slug / f"{study_name}.parquet")

    study = STUDIES[study_name]
    brute = BruteForce(slug)
    shared_tv = []
    for i, trial in enumerate(study.load().head(n_trials).itertuples(index=False)):
        questions = study.exp2_questions(trial)
        states = questions[:-1] or questions
        question = states[(i // 4) % len(states)] if i % 4 == 0 else questions[-1]
        forms = table[(table.trial_id == trial.trial_id) & (table.question == question.key)]
        rows = options_of(forms).sort_values("option_index")
        assert list(rows.option) == list(question.options)
        assert forms.groupby("option", sort=False)["variant"].apply(tuple).tolist() == list(question.variants)
        reference = brute.distribution(question)
        shared_tv.append(_total_variation(rows.probability.to_numpy(), reference))
    print(
        f"\n{slug} {study_name}: total variation of the asset's distributions vs brute force over {n_trials} "
        f"trials: max {max(shared_tv):.2e}, median {np.median(shared_tv):.2e} (the shared path's split noise)"
    )
    assert max(shared_tv) < 1e-4


@asset(
    key=AssetKey(["test", "downstream_of_probabilities"]),
    partitions_def=model_study_partitions,
    deps=[exp2_probabilities],
)
def downstream_of_probabilities() -> None:
    """Stands in for an analysis asset: it must not run on a partition whose blocking checks failed."""


def _corrupt_sum(table: pd.DataFrame) -> pd.DataFrame:
    first = (table.trial_id == table.trial_id.iloc[0]) & (table.question == "state1")
    table.loc[first, "probability"] *= 0.97
    return table


def _corrupt_nan(table: pd.DataFrame) -> pd.DataFrame:
    table.loc[table.index[3], "probability"] = math.nan
    return table


def _corrupt_missing_state(table: pd.DataFrame) -> pd.DataFrame:
    return table[table.question != "state2"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "corrupt,failing_check",
    [
        (_corrupt_sum, "probabilities_sum_to_one"),
        (_corrupt_nan, "probabilities_within_unit_interval"),
        (_corrupt_missing_state, "every_trial_and_question_scored"),
    ],
    ids=["sums-to-0.97", "nan", "missing-state"],
)
def test_corrupted_table_fails_blocking_check_and_downstream_does_not_materialize(
    tmp_path, servers, corrupt, failing_check
):
    server = servers("gemma3-270m")
    instance = DagsterInstance.ephemeral()
    res = pipeline.resources(tmp_path, trial_limit=1, base_urls={"gemma3-270m": server.base_url})
    pipeline.prepare(instance, res, ["gemma3-270m"], studies=("study1",))
    good = materialize(
        [*ALL_ASSETS, *ALL_CHECKS, downstream_of_probabilities],
        selection=[exp2_probabilities.key, downstream_of_probabilities.key],
        partition_key=pipeline.key("gemma3-270m", "study1"),
        resources=res,
        instance=instance,
    )
    assert good.success, "an uncorrupted table passes and the downstream asset runs"
    assert downstream_of_probabilities.key in {m.asset_key for m in good.get_asset_materialization_events()}

    path = tmp_path / "data" / "exp2" / "probabilities" / "gemma3-270m" / "study1.parquet"
    corrupt(pd.read_parquet(path)).to_parquet(path)
    checks = [c for c in ALL_CHECKS if any(k.asset_key == exp2_probabilities.key for k in c.check_keys)]
    bad = materialize(
        [*checks, downstream_of_probabilities, exp2_probabilities],
        selection=AssetSelection.checks_for_assets(exp2_probabilities)
        | AssetSelection.assets(downstream_of_probabilities),
        partition_key=pipeline.key("gemma3-270m", "study1"),
        resources=res,
        instance=instance,
        raise_on_error=False,
    )
    assert not bad.success
    evaluations = {e.check_name: e for e in bad.get_asset_check_evaluations()}
    assert not evaluations[failing_check].passed
    assert evaluations[failing_check].severity.value == "ERROR"
    assert downstream_of_probabilities.key not in {m.asset_key for m in bad.get_asset_materialization_events()}


def _long(trial_ids, questions, probabilities) -> pd.DataFrame:
    rows = []
    for t in trial_ids:
        for q, options in questions.items():
            for i, (o, p) in enumerate(zip(options, probabilities[q])):
                rows.append(dict(trial_id=t, question=q, option_index=i, option=o, probability=p, captured_mass=0.5))
    return pd.DataFrame(rows)


def test_check_functions_on_small_tables():
    study = STUDIES["study2"]
    trials = study.load()
    # Two trials asked the utterance question only (one goal condition's trials also get the literal-meaning task).
    trials = trials[[len(study.exp2_questions(t)) == 1 for t in trials.itertuples(index=False)]].head(2)
    context = CheckContext(trials, ExperimentSettings(min_captured_mass=0.6), study)
    options = list(study.exp2_questions(next(trials.itertuples(index=False)))[0].options)
    good = _long(trials.trial_id, {"utterance": options}, {"utterance": [1 / 8] * 8})
    assert probabilities_sum_to_one(good, context).passed
    assert probabilities_within_unit_interval(good, context).passed
    assert every_trial_and_question_scored(good, context).passed
    low = captured_mass_reported(good, context)
    assert not low.passed and low.metadata["below_threshold"] == 2

    off = good.copy()
    off.loc[0, "probability"] = 1 / 8 + 2e-6
    outcome = probabilities_sum_to_one(off, context)
    assert not outcome.passed and outcome.metadata["off_by_more_than_1e-6"] == 1
    assert outcome.metadata["max_abs_deviation"] == pytest.approx(2e-6)
    negative = good.copy()
    negative.loc[0, "probability"] = -0.1
    assert probabilities_within_unit_interval(negative, context).metadata["outside_0_1"] == 1
    incomplete = good.drop(index=2)
    assert every_trial_and_question_scored(incomplete, context).metadata["incomplete_option_sets"] == 1


def test_summaries_of_known_distributions():
    question = Question("state0", [], tuple(f"{p}%" for p in range(0, 101, 10)), values=tuple(range(0, 101, 10)))
    certain = np.zeros(11)
    certain[5] = 1.0
    assert summaries(question, certain) == {"entropy_bits": 0.0, "mean": 50.0, "sd": 0.0}
    uniform = np.full(11, 1 / 11)
    out = summaries(question, uniform)
    assert out["entropy_bits"] == pytest.approx(math.log2(11))
    assert out["mean"] == pytest.approx(50.0) and out["sd"] == pytest.approx(math.sqrt(1000))
    utterance = STUDIES["study2"].exp2_questions(next(STUDIES["study2"].load().itertuples(index=False)))[0]
    p = np.array([0.1, 0.1, 0.1, 0.1, 0.3, 0.1, 0.1, 0.1])
    assert summaries(utterance, p)["p_negation"] == pytest.approx(0.6)


def test_each_answer_is_scored_in_its_surface_forms_and_merged_per_answer():
    """Hand-computed: "yes" holds 0.2 + 0.1 + 0.05 + 0.05 over its forms, "no" 0.1 + 0.1 + 0 + 0."""
    yes_no = Question("knowledge", [], ("yes", "no"))
    assert yes_no.variants == (("yes", "yes.", "Yes", "Yes."), ("no", "no.", "No", "No."))
    assert Question("state0", [], ("40%",)).variants == (("40%", "40%."),)
    flat = list(yes_no.forms)
    logprobs = [math.log(p) for p in (0.2, 0.1, 0.05, 0.05, 0.1, 0.1)] + [-math.inf, -math.inf]
    scores = AnswerScores.merge(OptionScores.from_logprobs(flat, logprobs, [1] * 8), [4, 4])
    assert scores.captured_mass == pytest.approx(0.6)
    assert scores.probabilities == pytest.approx([0.4 / 0.6, 0.2 / 0.6])
    assert scores.logprobs == pytest.approx([math.log(0.4), math.log(0.2)])
    assert scores.variant_logprobs[0][1] == pytest.approx(math.log(0.1)) and scores.variants[1][2] == "No"
