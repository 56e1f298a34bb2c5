"""`unidiff tokenizer train`: the SigLIP-VQ image tokenizer's ViT trained with a SigLIP objective, then its codebook."""
