"""Models: shared blocks (fused embedding, first order, FM, MLP) and the models built from them."""

from deepfm.models.baselines import init_from_fm
from deepfm.models.ctr import MODEL_NAMES, MODELS, CTRModel, ModelConfig, build_model

__all__ = ["CTRModel", "ModelConfig", "MODELS", "MODEL_NAMES", "build_model", "init_from_fm"]
