"""A checkpoint as a torch module: the MLP a state dict describes, Hugging Face models through transformers,
the zero pattern as explicit masks, and sentence pooling. Training, export and bench all load models here."""
