"""Source of the UniSegText knowledge tree: curated YAML, the UBERON import and build tools.

``python -m knowledge_tree.validate`` checks the YAML, ``python -m knowledge_tree.build``
compiles it into ``unisegtext/knowledge/ontology.json`` and
``python -m knowledge_tree.import_uberon`` regenerates ``knowledge_tree/imported/``.
"""
