"""The studies: each is data (inputs, options) plus a small module. Assets reach them only through `STUDIES`."""

from grace_dagster.studies import study1, study2
from grace_dagster.studies.base import ID_COLUMN, Study
from grace_dagster.studies.inputs import InputError

STUDIES: dict[str, Study] = {s.name: s for s in (study1.STUDY, study2.STUDY)}

__all__ = ["ID_COLUMN", "STUDIES", "InputError", "Study"]
