"""Stage 5: adapters merged into the base, shard by shard.

run.py (merge_run: the stage, lora/qlora streamed and published as RUN_DIR/merged),
full.py (method=full: final/ as it is, or a ZeRO checkpoint consolidated), inputs.py (the
base's directory, the files copied beside the weights, the fingerprint of the inputs),
verify.py (merged vs base + adapter logits), lora.py (the adapter mathematics),
safetensors_stream.py (reading and writing shards without loading the model).
"""
