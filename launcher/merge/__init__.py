"""Stage 5: adapters merged into the base, shard by shard.

run.py (merge_run: fingerprint, verify, publish RUN_DIR/merged), lora.py (the adapter
mathematics), safetensors_stream.py (reading and writing shards without loading the model).
"""
