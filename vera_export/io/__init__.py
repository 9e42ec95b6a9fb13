"""Reading and writing: input locations, safetensors headers, indexes, loading and writing tensors, overlapped
streams, staged outputs and side files. Nothing here knows about VeRA."""
