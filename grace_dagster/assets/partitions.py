"""Partition definitions, shared by every asset.

Experiment outputs are partitioned by model (dynamic: models come and go with the registry) × study (static).
"""

from dagster import DynamicPartitionsDefinition, MultiPartitionsDefinition, StaticPartitionsDefinition

from grace_dagster.studies import STUDIES

study_partitions = StaticPartitionsDefinition(list(STUDIES))
model_partitions = DynamicPartitionsDefinition(name="model")
model_study_partitions = MultiPartitionsDefinition({"model": model_partitions, "study": study_partitions})
