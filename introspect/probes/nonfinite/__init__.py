"""The non-finite check: which module made the first NaN/Inf, and on which rank.

``sentinel`` (every step: a few fused norms, one host read) fires the ``replay`` of a bad step,
which runs ``per_module``'s check on every watched module to name the origin; ``per_module`` also
runs alone (``check_mode="per_module"``), and ``rank`` names the rank under DDP.
"""
