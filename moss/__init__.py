"""moss: the thin layer users touch (command line now; adapters, training and generation
plug transformers backbones into :mod:`moss_kernels`)."""
