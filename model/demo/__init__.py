"""The embedded demo model: a tiny Qwen3.5 MoE trained on synthetic tool-use conversations.

`DEMO_GGUF` is what `deltaserve serve` serves when given no model; build.json beside it summarises how
it was built. The pipeline that makes it lives outside the package, in the repository's demo/
(`python -m demo.build`).
"""

from pathlib import Path

DEMO_GGUF = Path(__file__).resolve().parent / "deltaserve-demo.gguf"
