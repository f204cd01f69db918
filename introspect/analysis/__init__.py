"""Looking at a model without training it: the summary and graph (``summary``, ``module_graph``),
weight statistics and spectra (``weight_stats``, ``spectral``), where two models diverge
(``compare``), input data checks (``data``) and the health map's picture (``health_map_render``)."""
