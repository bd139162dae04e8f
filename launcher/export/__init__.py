"""export: the fine-tuned model in another deployment format, checked by a consumer we did
not write (`tune-launch export RUN_DIR --format gguf|int4`, launcher/export/run.py).

    run.py        argument checks, the format registry, staging, validation.json, publish
    reference.py  held-out prompts and the merged model's greedy answers (transformers)
    gguf.py       llama.cpp's converter -> F16 / Q8_0 / Q4_K_M GGUF, run by llama.cpp
    modelfile.py  the Ollama Modelfile: training's chat template and stop tokens (pure)
    int4.py       llm-compressor GPTQ W4A16 (compressed-tensors), validated by a loader
    int4_quantize.py  the quantizer itself, run in llm-compressor's own package overlay

The merged model (RUN_DIR/merged) stays the default deployment artifact: export only reads it.
"""
