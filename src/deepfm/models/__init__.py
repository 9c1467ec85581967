"""Models: shared blocks (fused embedding, first order, FM, MLP) and the models built from them."""

from deepfm.models.ctr import MODELS, CTRModel, ModelConfig, build_model

__all__ = ["CTRModel", "ModelConfig", "MODELS", "build_model"]
