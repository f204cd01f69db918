"""Reading saved models and inputs, safe by default: ``models`` (``load_model``), the file
``formats``, Hugging Face folders (``hf_folder``), bounded archive reads (``archive``), folder walks
and images (``files``), and the inputs a command feeds a model (``model_inputs``)."""
