"""The functional API of fastgen's fused ops: what users import.

Each function validates its arguments, then calls its ``torch.ops.fastgen`` op, inside which
:func:`fastgen.backend.dispatch` runs the Triton kernels or the reference
(:mod:`fastgen.reference`, same signatures and semantics). The ops live in :mod:`fastgen.ops`,
one module per family; this module is their facade.
"""

from fastgen.ops import (CONV_IMPLEMENTATION_TUNER, CONV_IMPLEMENTATIONS, DLossOutput, GLossOutput,
                         bce_with_logits, bn_act, conv_bias_act, conv_bn_act, gan_d_loss, gan_g_loss,
                         log_normal_diag, modulated_conv2d, reparameterize)

__all__ = ["bce_with_logits", "gan_d_loss", "gan_g_loss", "DLossOutput", "GLossOutput",
           "reparameterize", "log_normal_diag", "conv_bn_act", "conv_bias_act", "bn_act",
           "CONV_IMPLEMENTATIONS", "CONV_IMPLEMENTATION_TUNER", "modulated_conv2d"]
