"""hf_adapt_pruner: Adapt-Pruner (arXiv 2502.03460) for Hugging Face transformers."""

from .architectures import ArchitectureSpec, get_architecture, register_architecture, supported_model_types
from .calibration import calibration_blocks
from .callback import AdaptPrunerCallback
from .config import PrunerConfig
from .data import CalibrationPool, token_blocks
from .distillation import DistillationConfig
from .gguf_export import export_gguf
from .history import pruning_history
from .hub import push_pruned_to_hub
from .layout import LAYOUT_KEY, LayerWidths, PrunedLayout
from .one_shot import prune_model
from .plans import LayerGeometry
from .pruner import AdaptivePruner, count_parameters, current_layout, materialize_masks
from .report import LayerReport, PruneReport
from .scorers import CalibrationScorer, StaticScorer
from .serialization import check_weights_match_layout, load_pruned, save_pruned
from .version import __version__


__all__ = [
    "LAYOUT_KEY",
    "AdaptPrunerCallback",
    "AdaptivePruner",
    "ArchitectureSpec",
    "CalibrationPool",
    "CalibrationScorer",
    "DistillationConfig",
    "LayerGeometry",
    "LayerReport",
    "LayerWidths",
    "PruneReport",
    "PrunedLayout",
    "PrunerConfig",
    "StaticScorer",
    "__version__",
    "calibration_blocks",
    "check_weights_match_layout",
    "count_parameters",
    "current_layout",
    "export_gguf",
    "get_architecture",
    "load_pruned",
    "materialize_masks",
    "prune_model",
    "pruning_history",
    "push_pruned_to_hub",
    "register_architecture",
    "save_pruned",
    "supported_model_types",
    "token_blocks",
]
