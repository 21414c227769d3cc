"""Normalization layers of the zoo: WS conv, BCN (with its estimated batch stage) and BGN.

GN and BN baselines are torch's / timm's own layers.
"""
from .activation_checkpoint import (
    CheckpointedSequential, activation_checkpointing, checkpoint_module, recomputing, set_activation_checkpointing)
from .batch_channel_norm import BCN_BATCH_STAGES, BatchChannelNorm2d, running_stats_affine, set_bcn_batch_stage
from .batch_group_norm import BatchGroupNorm2d
from .estimated_batch_norm import EstimatedBatchNorm2d
from .eval_folding import FoldsConvNormsInEval, conv_norm_pairs, fold_conv_norms, folds_in_eval
from .frozen_affine import freeze_norms
from .fx_leaf import fx_leaf_call
from .memory_lean import memory_lean, memory_lean_enabled, set_memory_lean
from .nonfinite_stats import NonFiniteStatisticsWarning, name_stat_layers, skipped_updates
from .weight_standardization import (
    DEFAULT_WS_FORMULA, WS_FORMULAS, WSConv2d, WSFormula, convert_to_ws, resolve_ws_formula, standardize_conv_weight,
    standardize_weight)
