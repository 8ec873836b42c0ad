"""The serve wing: what serves a trained encoder. `inference.py` is the one way an encoder (any file kind
`artifacts` reads, ONNX through onnxruntime) is loaded and run; `embed.py` turns a folder of images into
vectors (`vectors.py` writes and reads them), `search.py` is the top-k cosine search over them,
`neighbors.py` answers queries against an index, and `predict.py` labels images with a fine-tuned
classifier."""
