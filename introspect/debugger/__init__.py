"""The verdicts, from numbers alone: findings and their report (``alerts``), unit and gradient
health (``health``), the origin of the first non-finite value (``origins``), and each module
against its own past (``baselines``). Nothing here touches a model or a writer, so every layer
above may report a finding."""
