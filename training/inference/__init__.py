"""The inference room: what `unidiff generate`, `unidiff eval` and the harness adapters share, apart from training.

    backbone.py   one loader for a trained backbone: an HF dir, a checkpoint dir, or the run's latest valid
                  checkpoint; bf16 on CUDA, fp32 on the CPU (accelerator.inference_dtype)
    generate.py   understanding, text-to-image and editing on a loaded backbone (prompts from
                  data_pipeline.layout, images through data_pipeline.image_tokenizer.prepare), and `generate_files`,
                  the typed entry of `unidiff generate`
    decoders.py   a decoder checkpoint -> a callable VQ ids -> pixels (training.decoder.decode.decode_tokens)

The samplers stay with the diffusion code (training/diffusion/samplers/) and take their knobs as one
`SamplerSettings`, built from `cfg.diffusion` by `SamplerSettings.from_config`. Nothing is imported here, so
importing one part (say the loader) does not pull in the decoder stack.
"""
