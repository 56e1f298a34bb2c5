"""SigLIP-VQ image tokenizer: the released architecture and weight layout, tiny configs for tests."""
from data_pipeline.image_tokenizer.load import (ImageTokenizer, build_image_tokenizer, load_image_tokenizer,
                                                save_image_tokenizer)

__all__ = ["ImageTokenizer", "build_image_tokenizer", "load_image_tokenizer", "save_image_tokenizer"]
