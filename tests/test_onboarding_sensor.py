"""The onboarding sensor's decisions, evaluated on a real (temporary) instance without the daemon."""

from __future__ import annotations

from dagster import DagsterInstance, SensorResult, SkipReason, build_sensor_context, materialize

from grace_dagster.assets import study_trials
from grace_dagster.resources import ExperimentSettings, LLMEndpoints, Storage
from grace_dagster.sensors import EXPERIMENT_KEYS, onboard_new_models


def test_new_registry_participants_get_a_partition_and_one_run_per_study_once_inputs_are_validated(tmp_path):
    (tmp_path / "home").mkdir()
    instance = DagsterInstance.local_temp(tempdir=str(tmp_path / "home"))
    llm = LLMEndpoints()  # the packaged registry: two embedded participants and cluster models
    instance.add_dynamic_partitions("model", ["smollm2-135m"])

    def evaluate():
        with build_sensor_context(instance=instance, resources={"llm": llm}) as context:
            return onboard_new_models(context)

    waiting = evaluate()
    assert isinstance(waiting, SkipReason) and "study_trials" in waiting.skip_message

    storage = Storage(data_dir=str(tmp_path / "data"))
    for study in ("study1", "study2"):
        resources = {"storage": storage, "settings": ExperimentSettings()}
        assert materialize([study_trials], partition_key=study, resources=resources, instance=instance).success
    result = evaluate()
    assert isinstance(result, SensorResult)
    (added,) = result.dynamic_partitions_requests
    assert list(added.partition_keys) == ["gemma3-270m"]  # cluster models are not onboarded in local mode
    requests = {r.partition_key: r for r in result.run_requests}
    assert set(requests) == {"gemma3-270m|study1", "gemma3-270m|study2"}
    for request in requests.values():
        assert list(request.asset_selection) == EXPERIMENT_KEYS
        assert request.tags["grace/model"] == "gemma3-270m" and request.tags["grace/user"]

    instance.add_dynamic_partitions("model", ["gemma3-270m"])
    assert isinstance(evaluate(), SkipReason)
