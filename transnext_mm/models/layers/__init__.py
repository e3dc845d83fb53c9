from .aggregated_attention import AggregatedAttention, FullAttention
from .block import OverlapPatchEmbed, TransNeXtBlock
from .conv_glu import ConvGLU
from .log_cpb import POS_BIAS_MODES, LogCPB, log_cpb_bias, set_pos_bias_cache

__all__ = [
    'AggregatedAttention', 'FullAttention', 'OverlapPatchEmbed', 'TransNeXtBlock', 'ConvGLU',
    'POS_BIAS_MODES', 'LogCPB', 'log_cpb_bias', 'set_pos_bias_cache'
]
