"""Dataset descriptors (one YAML per dataset) and the tool that compiles them.

See schema.md for the descriptor schema and ``python -m data_registry.build`` to compile
``unisegtext/data/registry.json``.
"""
