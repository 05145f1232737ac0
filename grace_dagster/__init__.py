"""Grace on Dagster: psycholinguistics studies rerun with open LLMs as participants."""
