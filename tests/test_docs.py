"""Every Python block of docs/python-api.md runs, in order, on tiny data in a temporary folder."""

from __future__ import annotations

import re
from pathlib import Path

from .conftest import write_npz

PAGE = Path(__file__).parents[1] / "docs" / "python-api.md"
FASHION_MNIST = '"/usr/share/datasets/fashion-mnist"'
TINY_EVALUATION = (
    "EvaluateConfig(num_samples=24, cas_samples=48, cas_steps=2, reject_fractions=(0.5,), "
    "kid_subsets=3, inception_score_splits=2)"
)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def tiny(block: str, data: Path) -> str:
    """A block with the tiny preset, tiny data and a few steps in place of the page's."""
    block = block.replace(FASHION_MNIST, repr(str(data)))
    block = block.replace("fashion-mnist-32", "tiny")  # the presets of each stage
    block = re.sub(r"train\.max_steps=\d+", "train.max_steps=2", block)
    block = re.sub(r"resume=True, max_steps=\d+", "resume=True, max_steps=3", block)
    block = re.sub(r"top_k=\d+", "top_k=8", block)  # the tiny priors have 16 codes
    return re.sub(r"EvaluateConfig\([^)]*\)", TINY_EVALUATION, block)


def test_every_python_block_of_the_api_page_runs(tmp_path, monkeypatch):
    blocks = python_blocks(PAGE.read_text())
    assert len(blocks) == 6
    data = write_npz(tmp_path / "blobs.npz", count=300, size=32, classes=4)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(tiny(block, data), str(PAGE), "exec"), namespace)  # noqa: S102
    run = namespace["run"]
    assert run.level_names == ("top", "bottom") and run.num_classes == 4
    assert namespace["result"].images.shape == (10, 1, 32, 32)
    assert namespace["kept"].images.shape == (20, 1, 32, 32)
    assert (tmp_path / "runs" / "api" / "report" / "report.json").is_file()
    assert (tmp_path / "runs" / "api" / "unpacked" / "sample.png").is_file()
    assert len(namespace["models"].priors) == 2 and namespace["images"].shape[0] == 4
    assert (tmp_path / "runs" / "api-onnx" / "decoder.onnx").is_file()
