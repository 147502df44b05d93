"""ctrak: concept-level training-data attribution for diffusion models (Concept-TRAK).

The pure math lives here (torch, plus diffusers/transformers for loading models); the Ray
pipeline is in `pipeline/`, the command line in `jobs/`.
"""

__version__ = "0.1.0"
