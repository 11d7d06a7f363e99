"""A folder of textual-inversion embeddings, and where their names occur in a prompt.

As AUTOMATIC1111 matches them (modules/textual_inversion/textual_inversion.py, `EmbeddingDatabase`,
at commit 22ecb78b): each embedding's name (its file's stem) is tokenized, and wherever that run of
token ids occurs in the tokens of one weighted piece of the prompt, it is replaced by the
embedding's vectors, the longest name first. So the name must appear as the tokenizer splits it:
`rose` matches in "a rose circle" but not in "roses".

Files are found up front, in subfolders too (their names: cheap); one is read only when its name
occurs in a prompt, and a name that two files have is refused then.
An embedding whose vectors do not fit the model's text encoder (SD 1.x's 768 on SD 2.x, say) is
left out as A1111 leaves it out: its name stays plain text, and a warning says so once.
"""

import warnings
from pathlib import Path

from transformers import CLIPTokenizer

from ldm.embeddings import SUFFIXES, Embedding, EmbeddingError, read_embedding
from ldm.text import clean_text

Match = tuple[Embedding, int]  # the embedding, and how many prompt tokens its name took


class EmbeddingFolder:
    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise EmbeddingError(f"--embeddings {self.folder}: no such folder")
        self.files: dict[str, list[Path]] = {}  # name -> its files (more than one: refused when used)
        for path in sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()):
            self.files.setdefault(path.stem, []).append(path)
        self._loaded: dict[str, Embedding] = {}
        self._names: dict[int, list[tuple[list[int], str]]] = {}  # per tokenizer: (ids, name), longest first
        self._warned: set[str] = set()

    def embedding(self, name: str) -> Embedding:
        if name not in self._loaded:
            if len(self.files[name]) > 1:
                twice = ", ".join(map(str, self.files[name]))
                raise EmbeddingError(f"--embeddings: {len(self.files[name])} embeddings named {name!r}: {twice}")
            self._loaded[name] = read_embedding(self.files[name][0])
        return self._loaded[name]

    def names(self, tokenizer: CLIPTokenizer) -> list[tuple[list[int], str]]:
        key = id(tokenizer)
        if key not in self._names:
            tokenized = [(tokenizer(clean_text(name), add_special_tokens=False).input_ids, name) for name in self.files]
            self._names[key] = sorted(((ids, name) for ids, name in tokenized if ids), key=lambda p: -len(p[0]))
        return self._names[key]

    def find(self, tokenizer: CLIPTokenizer, ids: list[int], position: int, widths: list[int]) -> Match | None:
        """The embedding whose name starts at ids[position] (the longest such), if it has vectors for
        each of the model's text encoders (`widths`); one that does not fit is warned about and
        read as text."""
        for name_ids, name in self.names(tokenizer):
            if ids[position : position + len(name_ids)] != name_ids:
                continue
            embedding = self.embedding(name)
            if all(embedding.for_encoder(k, len(widths), width) is not None for k, width in enumerate(widths)):
                return embedding, len(name_ids)
            if name not in self._warned:
                self._warned.add(name)
                widths = "/".join(str(v.shape[-1]) for v in embedding.vectors.values())
                warnings.warn(
                    f"embedding {name!r} ({widths} wide) does not fit this model's text encoder: read as text",
                    stacklevel=2,
                )
        return None


def check_hashes(folder: EmbeddingFolder | None, recorded: str) -> None:
    """An image's `TI hashes` ("name: hash, ..."): each embedding it names must be in the folder,
    or the prompt would read its name as text; one whose file differs is warned about."""
    for entry in recorded.split(","):
        name, _, short = (part.strip() for part in entry.partition(":"))
        paths = folder.files.get(name) if folder else None
        if not paths:
            where = f"not in {folder.folder}" if folder else "no embeddings folder; pass --embeddings DIR"
            raise EmbeddingError(f"the image used the embedding {name!r} [{short}]: {where}")
        here = folder.embedding(name).short_hash[: len(short)]
        if here != short:
            path = paths[0]
            warnings.warn(f"embedding {name!r}: {path} [{here}] is not the file the image used [{short}]", stacklevel=2)
