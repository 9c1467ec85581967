"""Models: the paper's blocks (layers.py, dropout.py), DeepFM and its switch-off kinds (ctr.py), the other
baselines of its Table 2 (baselines.py), and ``build_model`` by name (build.py). Plain PyTorch: the fused
CPU kernels are applied with ``deepfm.accel.accelerate``."""

from deepfm.models.baselines import init_from_fm
from deepfm.models.build import build_model
from deepfm.models.ctr import MODEL_NAMES, MODELS, CTRModel, ModelConfig

__all__ = ["CTRModel", "ModelConfig", "MODELS", "MODEL_NAMES", "build_model", "init_from_fm"]
