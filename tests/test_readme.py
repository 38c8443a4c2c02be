"""The README's code runs as written (on a tiny checkpoint instead of a real gpt-oss folder)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_block_runs(tiny2_hf):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    namespace: dict = {}
    exec(blocks[0].replace("path/to/gpt-oss-folder", tiny2_hf[1]), namespace)
    vocab = namespace["config"].vocab_size
    assert namespace["logits"].shape == (1, 1, vocab) and int(namespace["cache"]["lengths"][0]) == 5
    assert namespace["both"].shape == (2, 1, 4, vocab)


def test_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    commands = [line for line in lines[:6] if line.startswith("pip install")]
    assert commands[0].split("#")[0].strip().endswith("python -m train.distill")
    assert commands[1].split("#")[0].strip().endswith("pytest -q")


def test_relative_links_resolve():
    """Every relative link (and image) in the README, docs/ and eval/ pages points at a repository file."""
    root = README.parent
    broken = []
    for page in [README, *sorted((root / "docs").glob("*.md")), *sorted((root / "eval").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            path = (page.parent / target).resolve()
            if not path.exists() or root not in path.parents:
                broken.append(f"{page.relative_to(root)}: {target}")
    assert not broken, broken


def test_readme_stays_short():
    assert len(README.read_text().splitlines()) <= 200
