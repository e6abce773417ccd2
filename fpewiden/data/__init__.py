"""What models are trained and measured on: DATA specs (built-in DNF tasks, digits, tensor files, `embed:`
sentence sets), text samples and tokenizers for Hugging Face models, and what labels imply (loss, metrics).
Nothing here trains or builds a model."""
