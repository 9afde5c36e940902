"""Glue to training frameworks; each submodule imports its framework lazily (``lorakit.integrations.transformers``)."""
