"""Names and defaults of the ops layer, importable without torch (the CLI reads them to answer
``--help`` at once): the one default objective, the objective kinds and normalisations, the
feature losses.
"""

# The one default objective of the package (library functions, KDObjective, the distillers and the
# trainer's CLI): the paper's CNN values T = 3, alpha = 0.3, with Hinton's kd_scale = T*T (SPEC
# section 2). The paper recipes set their own values explicitly (the official code uses kd_scale 1).
DEFAULT_TEMPERATURE = 3.0
DEFAULT_ALPHA = 0.3

KD_KINDS = ("kl", "paper-code")
"""``kl``: the fused KL objective (SPEC section 2); ``paper-code``: the official online-KD code's
objective (probabilities fed to ``KLDivLoss``; not a divergence), for replication only."""

KD_NORMALIZATIONS = ("batch", "class")
"""How the KL term is averaged: ``batch`` (mean over rows) or ``class`` (mean over rows, then
divided by the number of classes, as the official ViT code does)."""

FEATURE_LOSSES = ("dist", "l1", "l2", "smooth-l1")
"""Feature losses between projected student and teacher features (:func:`.losses.feature_loss`)."""
