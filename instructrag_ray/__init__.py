"""instructrag-ray: InstructRAG rationale synthesis, SFT and evaluation as Ray Data / Ray Train jobs.

Importing the package is cheap: Ray, torch, transformers and tantivy are imported inside the
functions that need them.
"""

__version__ = "0.1.0"
