from .aggregated_attention import (aggregated_attention, aggregated_attention_reference,
                                   aggregated_attention_torch, op_available)

__all__ = [
    'aggregated_attention', 'aggregated_attention_reference', 'aggregated_attention_torch',
    'op_available'
]
