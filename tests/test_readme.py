"""The README's first client example runs as written against a real server."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_token_client_example_runs(tokensvc):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = blocks[0].replace("127.0.0.1:50051", tokensvc.target)
    namespace: dict[str, object] = {}
    exec(compile(example, "README.md", "exec"), namespace)
    info = namespace["info"]
    assert info.active and info.subject == "alice"
