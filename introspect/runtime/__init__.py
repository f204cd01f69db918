"""What watching needs from torch at run time: which modules to watch (``selection``), the floating
tensors of an output (``tensors``), compiled and AMP models (``compiled``, ``amp``), ranks
(``distributed``), side-effect-free extra forwards (``preserved``) and the record of every change
made to the process (``registry``)."""
