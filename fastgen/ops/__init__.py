"""fastgen's fused ops, one module per family, each registered with ``torch.library`` in the
namespace ``fastgen`` (``torch.ops.fastgen.*``):

- :mod:`fastgen.ops.losses`: ``bce_with_logits``, ``gan_loss`` (the D and G losses);
- :mod:`fastgen.ops.reparam`: ``reparameterize``, ``log_normal_diag``;
- :mod:`fastgen.ops.conv`: ``conv_bn_act``, ``conv_bias_act``, ``bn_act``,
  ``update_running_stats`` (BN synchronized across ranks through :mod:`fastgen.ops.sync_bn`);
- :mod:`fastgen.ops.modconv`: ``modulated_conv2d`` (StyleGAN2);

each forward op with its ``*_backward`` op. A module holds the argument checks of its public
functions (shared checks in :mod:`fastgen.ops._checks`), the ops with their fake (meta)
implementations and autograd formulas, and the public functions that :mod:`fastgen.functional`
re-exports. Inside every op :func:`fastgen.backend.dispatch` picks the Triton kernels or the
reference, so a traced graph holds the same ``fastgen.*`` ops on every device and backend.
"""

from fastgen.ops.conv import (CONV_IMPLEMENTATION_TUNER, CONV_IMPLEMENTATIONS, bn_act,
                              conv_bias_act, conv_bn_act)
from fastgen.ops.losses import DLossOutput, GLossOutput, bce_with_logits, gan_d_loss, gan_g_loss
from fastgen.ops.modconv import modulated_conv2d
from fastgen.ops.reparam import log_normal_diag, reparameterize

__all__ = ["bce_with_logits", "gan_d_loss", "gan_g_loss", "DLossOutput", "GLossOutput",
           "reparameterize", "log_normal_diag", "conv_bn_act", "conv_bias_act", "bn_act",
           "CONV_IMPLEMENTATIONS", "CONV_IMPLEMENTATION_TUNER", "modulated_conv2d"]
