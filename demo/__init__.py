"""The pipeline that makes the embedded demo model (model/demo/deltaserve-demo.gguf), kept out of the wheel.

A tiny Qwen3.5 MoE trained here, seeded, on synthetic tool-use conversations:
`python -m demo.build` (corpus.py -> tokenizer.py -> train.py -> convert/gguf_writer.py) makes it and
`python -m demo.evaluate` measures it. build_info.json here records how the committed model was built;
the short build.json beside the GGUF is what ships. README.md tells its training history.
"""
