"""What is measured and how it is written: statistics (``stats``) of a step's tensors
(``step``, ``shards``), the one tag table (``tags``), TensorBoard writing (``sinks``, ``writer``,
``eventfile``), findings kept and written (``findings``), hyperparameters (``run_params``) and
pictures (``visuals``)."""
