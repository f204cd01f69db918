"""The verdicts, from numbers alone: findings and their report (``alerts``), unit and gradient
health (``health``), and the origin of the first non-finite value (``origins``). Nothing here
touches a model or a writer, so every layer above may report a finding."""
