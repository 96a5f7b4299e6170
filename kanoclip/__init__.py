"""KAnoCLIP as pure torch.nn.Modules: CLIP-VV backbone, KnPL prompts, Bi-CMCI, Conv-Adapter, scores, losses."""

from .adapter import ConvAdapter
from .backbone import Backbone, VisualFeatures, build_backbone, spread_stages
from .bicmci import BiCA, DeformableSelfAttention, LinearHead
from .losses import dice_loss, focal_loss, global_loss, local_loss
from .model import InferenceBatch, KAnoCLIP, ModelConfig, ModelOutput, backbone_autocast, full_precision, gaussian_blur
from .registry import DISPLAY_NAMES, TRAINED_METHODS, build_model, method_backbone, model_config
from .prompts import FIXED_ABNORMAL, FIXED_NORMAL, FixedPrompts, FreeTextVectors, PromptLearner, TextTower, kd_loss, knowledge_vector, tokenize

__all__ = ["Backbone", "BiCA", "ConvAdapter", "DeformableSelfAttention", "FIXED_ABNORMAL", "FIXED_NORMAL", "FixedPrompts", "FreeTextVectors",
           "InferenceBatch", "KAnoCLIP", "LinearHead", "ModelConfig", "ModelOutput", "PromptLearner", "TextTower",
           "VisualFeatures", "DISPLAY_NAMES", "TRAINED_METHODS", "backbone_autocast", "build_backbone", "build_model", "method_backbone", "model_config", "dice_loss", "focal_loss", "full_precision", "gaussian_blur", "global_loss", "kd_loss",
           "knowledge_vector", "local_loss", "spread_stages", "tokenize"]
