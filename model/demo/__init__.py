"""The embedded demo model: a tiny Qwen3.5 MoE trained here on synthetic tool-use conversations.

`DEMO_GGUF` is what `deltaserve serve` serves when given no model. It is made, seeded, by
`python -m model.demo.build` (corpus.py -> tokenizer.py -> train.py -> convert/gguf_writer.py) and
measured by `python -m model.demo.evaluate`; build_info.json records how it was built.
"""

from pathlib import Path

DEMO_GGUF = Path(__file__).resolve().parent / "deltaserve-demo.gguf"
